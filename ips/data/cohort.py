"""A manifest from a folder of stores and a labels table: `ips manifest STORES... --labels L --out M.csv`.

Each store `DIR/<slide_id>.zarr` (made by `ips prep`) is matched to the row of the labels CSV with the
same `slide_id`; the output is `slide_id,path,<every other column of the labels file>,split`. Splits:

- **stratified**: within each stratum (the value of the stratify columns, e.g. `label`) the slides are
  dealt to the splits so that each split's count is within one slide of its fraction of the stratum
  (exactly: every split's final deficit `fraction * n - count` lies in (-1, 1));
- **grouped** (`group_by`, e.g. `patient`): all slides of a group go to one split, so no patient spans
  two; a group's stratum is its most common one; larger groups are dealt first;
- **fixed**: a non-empty `split` cell in the labels file is kept, and its group goes with it;
- **seeded**: the order the groups are dealt in is a permutation drawn from `seed`, so the same inputs and
  seed give the same manifest.

Every problem is a `ManifestError` in one line naming the file and what is wrong: a store given twice, two
stores with one slide id, a store without a label row, a label row without a store, a slide listed twice
in the labels, a group with two fixed splits.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ips.data.manifest import SPLITS, _read_text
from ips.errors import ManifestError
from ips.format.names import COMPLETE_MARKER
from ips.format.store import is_complete

DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
_SHOWN = 5  # ids named in an error before "and N more"


@dataclass(frozen=True)
class CohortPlan:
    """How to split: `fractions` for train, val, test (summing to 1); `group_by` a labels column whose
    value groups slides (None: each slide alone); `stratify` the columns whose values define a stratum
    (empty: one stratum); `seed` for the order groups are dealt in."""

    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    group_by: str | None = None
    stratify: tuple[str, ...] = ("label",)
    seed: int = 0

    def __post_init__(self) -> None:
        f = self.fractions
        if len(f) != len(SPLITS) or any(not np.isfinite(x) or x < 0 for x in f) or abs(sum(f) - 1) > 1e-6:
            raise ManifestError(
                f"--split: fractions for {'/'.join(SPLITS)} must be 3 numbers >= 0 summing to 1, got {f}"
            )


def parse_fractions(text: str) -> tuple[float, float, float]:
    """`"0.6,0.2,0.2"` (or two values `train,val`, test 0) -> fractions; ManifestError if not numbers."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise ManifestError(f"--split: {text!r} is not comma-separated numbers, e.g. 0.6,0.2,0.2") from None
    if len(values) == 2:
        values.append(0.0)
    if len(values) != 3:
        raise ManifestError(
            f"--split: {text!r} has {len(values)} values; give train,val,test e.g. 0.6,0.2,0.2"
        )
    return values[0], values[1], values[2]


def _slide_id(store: str) -> str:
    name = store.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


def _named(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_SHOWN])
    return shown + (f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else "")


def match_stores(stores: Sequence[str]) -> dict[str, str]:
    """`{slide_id: store}` in the order given; ManifestError when one store (after resolving the path) is
    given twice, two stores share a slide id, or a local store does not exist or is not complete."""
    by_id: dict[str, str] = {}
    seen: dict[str, str] = {}
    for s in stores:
        if "://" not in s and not Path(s).is_dir():
            raise ManifestError(f"store {s} does not exist (a folder made by `ips prep`)")
        if "://" not in s and not is_complete(s):
            raise ManifestError(
                f"store {s} is not complete (no {COMPLETE_MARKER}): rerun `ips prep` on its slide"
            )
        key = s.rstrip("/") if "://" in s else str(Path(s).resolve())
        if key in seen:
            raise ManifestError(f"store {s} is given twice (also as {seen[key]})")
        seen[key] = s
        sid = _slide_id(s)
        if sid in by_id:
            raise ManifestError(f"two stores have the slide id {sid!r}: {by_id[sid]} and {s}")
        by_id[sid] = s
    return by_id


def read_labels(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of the labels CSV; ManifestError naming the file and row for a missing `slide_id`
    column, an empty id, or an id listed twice."""
    with io.StringIO(_read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        if "slide_id" not in header:
            raise ManifestError(
                f"{path}: row 1 (header): no 'slide_id' column (columns: {', '.join(header)})"
            )
        if "path" in header:
            raise ManifestError(f"{path}: row 1 (header): a 'path' column; the stores given make the paths")
        rows, first = [], {}
        for row in reader:
            cells = {k: (v or "").strip() for k, v in row.items() if k is not None}
            sid = cells["slide_id"]
            if not sid:
                raise ManifestError(f"{path}: row {reader.line_num}: empty slide_id")
            if sid in first:
                raise ManifestError(
                    f"{path}: row {reader.line_num}: slide {sid!r} is listed twice (first at row {first[sid]})"
                )
            first[sid] = reader.line_num
            split = cells.get("split", "")
            if split and split not in SPLITS:
                raise ManifestError(
                    f"{path}: row {reader.line_num}: unknown split {split!r}; valid: {', '.join(SPLITS)}"
                )
            rows.append(cells)
    return header, rows


def assign_splits(
    strata: Sequence[str], groups: Sequence[str], fixed: Sequence[str], plan: CohortPlan
) -> list[str]:
    """The split of each slide (`strata`, `groups`, `fixed` are per slide; `fixed` '' = free).

    Groups are dealt one at a time, largest first (ties in a seeded random order), each to the split with
    the largest deficit `fraction * n_stratum - count` in its stratum (ties: the larger deficit over all
    slides, then train, val, test). A split with a larger deficit is never passed over for one with a
    smaller, so with groups of one slide every deficit ends in (-1, 1).
    """
    n = len(strata)
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    split_of: dict[str, str] = {}
    for g, idx in members.items():
        given = sorted({fixed[i] for i in idx if fixed[i]})
        if len(given) > 1:
            raise ManifestError(f"group {g!r} has slides fixed to two splits ({', '.join(given)})")
        if given:
            split_of[g] = given[0]
    stratum_of: dict[str, str] = {}
    for (
        g,
        idx,
    ) in members.items():  # the most common stratum; ties: the smallest value, whatever the row order
        counts = Counter(strata[i] for i in idx)
        top = max(counts.values())
        stratum_of[g] = min(s for s, c in counts.items() if c == top)
    f = np.asarray(plan.fractions, dtype=np.float64)
    size = Counter(stratum_of[g] for g, idx in members.items() for _ in idx)
    target = {s: f * size[s] for s in size}
    count = {s: np.zeros(len(SPLITS)) for s in size}
    total = np.zeros(len(SPLITS))
    for g, split in split_of.items():
        count[stratum_of[g]][SPLITS.index(split)] += len(members[g])
        total[SPLITS.index(split)] += len(members[g])
    free = sorted(g for g in members if g not in split_of)
    order = np.random.default_rng(plan.seed).permutation(len(free))
    free = sorted((free[k] for k in order), key=lambda g: -len(members[g]))  # stable: seeded ties
    for g in free:
        s = stratum_of[g]
        deficit, overall = target[s] - count[s], f * n - total
        best = max(range(len(SPLITS)), key=lambda k: (deficit[k], overall[k], -k))
        split_of[g] = SPLITS[best]
        count[s][best] += len(members[g])
        total[best] += len(members[g])
    return [split_of[g] for g in groups]


def build_manifest(stores: Sequence[str], labels: str | Path, plan: CohortPlan) -> list[dict[str, str]]:
    """The manifest rows, in the order of the stores: `slide_id, path, <labels columns>, split`."""
    labels = Path(labels)
    if not labels.is_file():
        raise ManifestError(f"{labels}: labels file does not exist")
    by_id = match_stores(stores)
    header, rows = read_labels(labels)
    for col in (*plan.stratify, *([plan.group_by] if plan.group_by else [])):
        if col not in header:
            raise ManifestError(f"{labels}: row 1 (header): no column {col!r} (columns: {', '.join(header)})")
    row_of = {r["slide_id"]: r for r in rows}
    unlabelled = [sid for sid in by_id if sid not in row_of]
    if unlabelled:
        raise ManifestError(f"{labels}: no label row for {len(unlabelled)} store(s): {_named(unlabelled)}")
    storeless = [sid for sid in row_of if sid not in by_id]
    if storeless:
        raise ManifestError(
            f"{labels}: {len(storeless)} labelled slide(s) have no store: {_named(storeless)}"
        )
    ids = list(by_id)
    picked = [row_of[sid] for sid in ids]
    if plan.group_by:
        empty = [sid for sid, r in zip(ids, picked, strict=True) if not r[plan.group_by]]
        if empty:
            raise ManifestError(f"{labels}: empty {plan.group_by!r} for slide(s) {_named(empty)}")
    strata = ["\t".join(r[c] for c in plan.stratify) for r in picked]
    groups = [r[plan.group_by] if plan.group_by else f"slide:{r['slide_id']}" for r in picked]
    splits = assign_splits(strata, groups, [r.get("split", "") for r in picked], plan)
    extra = [c for c in header if c not in ("slide_id", "split")]
    return [
        {"slide_id": sid, "path": by_id[sid], **{c: r[c] for c in extra}, "split": split}
        for sid, r, split in zip(ids, picked, splits, strict=True)
    ]


def write_manifest(rows: Sequence[dict[str, str]], path: str | Path) -> Path:
    """Write the rows as CSV (atomically: a temporary name, then a rename). Local store paths under the
    manifest's folder are written relative to it (the manifest reader resolves them against its folder),
    others absolute; URLs as given."""
    path = Path(path)
    folder = path.parent.resolve()
    columns = list(rows[0]) if rows else ["slide_id", "path", "label", "split"]
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            store = row["path"]
            if "://" not in store:
                full = Path(store).resolve()
                store = str(full.relative_to(folder)) if full.is_relative_to(folder) else str(full)
            writer.writerow({**row, "path": store})
    os.replace(tmp, path)
    return path
