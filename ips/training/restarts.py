"""A run that acts on the take-off guard (`ips.training.takeoff`): `train.restarts` further attempts.

The run directory `OUT` keeps the layout of a plain run, so that `ips predict` and `ips heatmap` read
`OUT/checkpoints/best.pt` as always:

- `OUT/` holds the current attempt while it trains, and the kept attempt at the end (its `config.yaml`,
  `metrics.*`, `curves.png`, `checkpoints/`);
- `OUT/attempts/attempt_<k>/` holds the same files of each attempt set aside;
- `OUT/takeoff.json` is the record: each attempt's seed, the guard's verdict, what became of it, and
  which attempt was kept.

Attempt k trains with `train.seed + RESTART_SEED_STEP * k`, so restarts of `--seeds 0,1,2` do not
repeat each other's seeds. When the guard finds attempt k at chance and restarts remain, the attempt
stops there and is set aside, and attempt k+1 starts in `OUT`; the last attempt runs to its end (the
guard then only says what it found). At the end the attempt with the best monitored value is kept.

Every step is written to the record before it is taken and every move is idempotent, so a run killed
at any point resumes where it was (`ips train` again with the same `--out`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ips.config import ExperimentConfig, with_overrides
from ips.errors import ConfigError, RunDirError
from ips.model.metrics import lower_is_better
from ips.runtime import DistInfo
from ips.training.distributed import barrier, broadcast_flag
from ips.training.loop import EpochHook, Trainer, train
from ips.training.rundir import DATA_FILE, RUN_FILES, RunLock, check_fresh, remove_run
from ips.training.takeoff import check_epoch, judge_takeoff, takeoff_message

RECORD = "takeoff.json"
ATTEMPTS = "attempts"
RESTART_SEED_STEP = 1000
# what an attempt consists of: the files of a plain run, less the record that spans all attempts
ATTEMPT_FILES = tuple(name for name in RUN_FILES if name != RECORD)


@dataclass
class Attempt:
    """One attempt of a run. `status`: training (not judged yet), took_off (the guard was silent),
    restarted (the guard fired: set aside, and the next attempt started), at_chance (the guard fired on
    the last attempt allowed, which went on)."""

    attempt: int
    seed: int
    status: str = "training"
    verdict: dict[str, Any] | None = None


@dataclass
class Record:
    """`OUT/takeoff.json`. `current`: the attempt whose files are in `OUT` (None while files move);
    `moves`: the moves under way, in order (`["out", k]`: `OUT` to `attempts/attempt_k`; `["in", k]`: back),
    after which attempt `then` is current; `kept`: the attempt chosen at the end."""

    attempts: list[Attempt]
    current: int | None = 0
    moves: list[list[Any]] = field(default_factory=list)
    then: int | None = None
    kept: int | None = None
    monitor: str | None = None

    @classmethod
    def load(cls, run_dir: Path, seed: int) -> Record:
        path = run_dir / RECORD
        if not path.exists():
            return cls([Attempt(0, seed)])
        data = json.loads(path.read_text())
        return cls(**{**data, "attempts": [Attempt(**a) for a in data["attempts"]]})

    def save(self, run_dir: Path) -> None:
        tmp = run_dir / (RECORD + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, run_dir / RECORD)  # a kill leaves the old record or the new one, never half

    def plan(self, moves: list[list[Any]], then: int, run_dir: Path) -> None:
        """Write the moves down, then make them (`finish_moves`): a rerun after a kill finishes them."""
        self.moves, self.then, self.current = moves, then, None
        self.save(run_dir)
        finish_moves(self, run_dir)


@dataclass
class GuardedRun:
    """What `train_with_restarts` returns: the kept attempt's rows and monitor, every attempt's record
    (empty where the guard never judged), and the training seconds of all attempts together."""

    run_dir: Path
    history: list[dict[str, Any]]
    monitor: str
    attempts: list[dict[str, Any]] = field(default_factory=list)
    kept: int = 0
    seconds: float = 0.0


def attempt_seed(seed: int, attempt: int) -> int:
    return seed + RESTART_SEED_STEP * attempt


def attempt_dir(run_dir: Path, attempt: int) -> Path:
    return run_dir / ATTEMPTS / f"attempt_{attempt}"


def remove_guarded_run(run_dir: Path) -> list[str]:
    """`--overwrite` of a run that the guard may have restarted: the run's own files (`remove_run`: its
    take-off record and data digest included) and every attempt set aside under `OUT/attempts/`; the
    names removed, relative to `run_dir`. Call it under the run's `RunLock`. Other files stay."""
    removed = remove_run(run_dir)
    parent = run_dir / ATTEMPTS
    for sub in sorted(parent.glob("attempt_*")) if parent.is_dir() else []:
        removed += [f"{ATTEMPTS}/{sub.name}/{name}" for name in remove_run(sub, (*ATTEMPT_FILES, DATA_FILE))]
        for empty in (sub / "checkpoints", sub):
            if empty.is_dir() and not any(empty.iterdir()):
                empty.rmdir()
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
    return removed


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch rows of the run in `run_dir` (`metrics.jsonl`; empty before its first epoch)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best_row(rows: Sequence[dict[str, Any]], monitor: str) -> dict[str, Any] | None:
    """The row `checkpoints/best.pt` holds: the first with the lowest (a loss, an error) or highest `monitor`,
    NaN left out; None when no row has a value."""
    scored = [r for r in rows if isinstance(r.get(monitor), (int, float)) and not math.isnan(r[monitor])]
    if not scored:
        return None
    sign = 1.0 if lower_is_better(monitor) else -1.0
    return min(scored, key=lambda r: sign * r[monitor])  # min keeps the first of equals


def move_attempt(src: Path, dst: Path) -> None:
    """Move an attempt's files from `src` to `dst`, file by file; a rerun after a kill finishes it."""
    for name in ATTEMPT_FILES:
        if (src / name).exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src / name, dst / name)


@contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """The run directory's lock, held while rank 0 moves files and writes the record (released while an
    attempt trains: `train` takes it)."""
    with RunLock(run_dir):
        yield


class _Guard:
    """The epoch-end hook of one attempt (rank 0): judges once, at the check epoch, records the verdict,
    says so when the run is at chance; returns True (stop) when the attempt is to be set aside."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        record: Record,
        k: int,
        run_dir: Path,
        epoch: int,
        log: Callable[[str], None],
    ) -> None:
        self.cfg, self.record, self.k = cfg, record, k
        self.run_dir, self.epoch, self.log = run_dir, epoch, log

    def __call__(self, rows: Sequence[dict[str, Any]]) -> bool:
        attempt = self.record.attempts[self.k]
        if attempt.verdict is not None:
            return False  # judged once per attempt
        verdict = judge_takeoff(
            rows, tasks=self.cfg.model.tasks, epoch=self.epoch, threshold=self.cfg.train.takeoff_auroc
        )
        if verdict is None:
            return False
        restart = verdict.fired and attempt.attempt < self.cfg.train.restarts
        attempt.verdict = verdict.to_dict()
        attempt.status = "restarted" if restart else "at_chance" if verdict.fired else "took_off"
        self.record.save(self.run_dir)
        if verdict.fired:
            seed = attempt_seed(self.cfg.train.seed, attempt.attempt + 1) if restart else None
            sel = self.cfg.selection
            self.log(
                takeoff_message(
                    verdict,
                    pretrained=bool(self.cfg.model.pretrained),
                    explore=sel.explore,
                    explore_novel=sel.explore_novel,
                    restart_seed=seed,
                )
            )
        return restart


def _as_hook(guard: _Guard) -> EpochHook:
    """The guard as the trainer's epoch hook: it judges every row so far (those before a resume too)."""

    def hook(trainer: Trainer, row: dict[str, Any]) -> str | None:
        rows = trainer.metrics_log.rows if trainer.metrics_log is not None else [row]
        return "at chance at the check epoch" if guard(rows) else None

    return hook


def train_with_restarts(
    cfg: ExperimentConfig,
    *,
    manifest: str | Path,
    run_dir: str | Path,
    dist_info: DistInfo | None = None,
    resume: bool = True,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> GuardedRun:
    """`ips.training.loop.train` with the take-off guard and `train.restarts`; arguments as there.

    Rank 0 judges, moves files and writes the record; every rank reads it (the run directory is shared,
    as a resumed run's checkpoint already is)."""
    dist_info = dist_info or DistInfo()
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} exists and is not a directory")
    epoch = check_epoch(cfg.train.takeoff_epoch, cfg.train.epochs)
    main = dist_info.is_main
    if main:
        with _locked(run_dir):
            if not resume:
                check_fresh(run_dir)
            record = Record.load(run_dir, cfg.train.seed)
            if record.attempts[0].seed != cfg.train.seed:
                raise RunDirError(
                    f"{run_dir}: cannot resume with a changed train.seed: {record.attempts[0].seed} -> "
                    f"{cfg.train.seed} ({RECORD}); use a new --out"
                )
            finish_moves(record, run_dir)  # a run killed while moving files
    barrier(dist_info)
    record = Record.load(run_dir, cfg.train.seed)
    if record.kept is not None and record.current != len(record.attempts) - 1:
        log(f"{run_dir}: complete; attempt {record.kept} of {len(record.attempts)} kept ({RECORD})")
        return _result(record, run_dir, record.monitor or cfg.train.monitor)
    while True:
        k = record.current
        assert k is not None
        guard = _Guard(cfg, record, k, run_dir, epoch, log) if main and epoch is not None else None
        if guard is not None:
            guard(read_rows(run_dir))  # a run killed between the check epoch's checkpoint and its check
        result = None
        if not _restarting(record, k, dist_info):
            result = train(
                with_overrides(cfg, train={"seed": record.attempts[k].seed}),
                manifest=manifest,
                run_dir=run_dir,
                dist_info=dist_info,
                resume=resume or k > 0,
                show_progress=show_progress,
                log=log,
                epoch_hooks=() if guard is None else (_as_hook(guard),),
            )
        if result is not None and not _restarting(record, k, dist_info):
            break
        if main:
            with _locked(run_dir):
                record.attempts.append(Attempt(k + 1, attempt_seed(cfg.train.seed, k + 1)))
                record.plan([["out", k]], k + 1, run_dir)
            log(
                f"restart {k + 1} of {cfg.train.restarts}: attempt {k} set aside in {attempt_dir(run_dir, k)}; "
                f"attempt {k + 1} (train.seed={record.attempts[k + 1].seed}) in {run_dir}"
            )
        barrier(dist_info)
        record = Record.load(run_dir, cfg.train.seed)
    if main and (run_dir / RECORD).exists():
        with _locked(run_dir):
            keep_best(record, run_dir, result.monitor)
        if len(record.attempts) > 1:
            log(
                f"kept attempt {record.kept} of {len(record.attempts)} (best {result.monitor}) in {run_dir}; "
                f"the others in {run_dir / ATTEMPTS} ({RECORD})"
            )
    barrier(dist_info)
    record = Record.load(run_dir, cfg.train.seed)
    return _result(record, run_dir, result.monitor)


def _restarting(record: Record, k: int, dist_info: DistInfo) -> bool:
    """Whether attempt k is to be set aside: rank 0's record, the same on every rank."""
    return broadcast_flag(record.attempts[k].status == "restarted", dist_info)


def finish_moves(record: Record, run_dir: Path) -> None:
    """Make the record's moves under way, one by one (each idempotent), then make `then` current."""
    while record.moves:
        way, k = record.moves[0]
        src, dst = (run_dir, attempt_dir(run_dir, k)) if way == "out" else (attempt_dir(run_dir, k), run_dir)
        move_attempt(src, dst)
        record.moves.pop(0)
        record.save(run_dir)
    if record.current is None:
        record.current, record.then = record.then, None
        record.save(run_dir)


def keep_best(record: Record, run_dir: Path, monitor: str) -> None:
    """Keep the attempt with the best monitored value (ties: the later); bring it to `OUT`, setting the
    current one aside, when it is not already there."""
    current = record.current
    assert current is not None
    candidates = []
    for a in record.attempts:
        row = best_row(
            read_rows(run_dir if a.attempt == current else attempt_dir(run_dir, a.attempt)), monitor
        )
        if row is not None:
            candidates.append((row[monitor], a.attempt))
    sign = 1.0 if lower_is_better(monitor) else -1.0
    kept = min(candidates, key=lambda c: (sign * c[0], -c[1]))[1] if candidates else current
    record.kept, record.monitor = kept, monitor
    if kept == current:
        record.save(run_dir)
        return
    record.plan([["out", current], ["in", kept]], kept, run_dir)


def _result(record: Record, run_dir: Path, monitor: str) -> GuardedRun:
    kept = record.current if record.current is not None else 0
    seconds = sum(
        float(r.get("seconds", 0.0))
        for a in record.attempts
        for r in read_rows(run_dir if a.attempt == kept else attempt_dir(run_dir, a.attempt))
    )
    has_record = (run_dir / RECORD).exists()
    return GuardedRun(
        run_dir,
        read_rows(run_dir),
        monitor,
        [asdict(a) for a in record.attempts] if has_record else [],
        kept,
        seconds,
    )
