"""Where to annotate next: how many annotated slides reach the target with `ips suggest` and with random choice.

Results page row: docs/BENCHMARKS.md, "Where to annotate next: suggest against random"

Per seed: one data set of a family (`ips.synthetic.families`; default a, small objects), the same `--start`
random training slides annotated for both methods (masks from the planted truth, as `ips synth annotate`
makes them). Then rounds, per method: `ips train` (`configs/demo.yaml`, `train.seed=S`), `ips predict
--split test`, `ips heatmap` of the positive test slides; when test accuracy >= `--accuracy` and mean heatmap
AUROC (`ips.bench.learn.heatmap_auroc`) >= `--auroc`, the row records how many slides were annotated; else
`--step` more are annotated, chosen by `ips suggest --checkpoint RUN/best.pt --manifest M --split train
--budget STEP` or at random among the unannotated training slides, until `--max` (then the row says
"> max"). Every step is the documented command, run in this process through `ips.cli.main.main`.

    python benchmarks/suggest_vs_random.py --family a --seeds 0,1,2 --out OUT --json OUT/result.json
    python benchmarks/suggest_vs_random.py --family b --digits ../shared/data/mnist_5k.csv.gz --out OUT ...

The random arm draws from its own stream (`random_stream`), independent of the stream that picks the start
set, so that its picks are not the continuation of the start's permutation.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ips.bench.learn import heatmap_auroc
from ips.cli.main import main as ips
from ips.synthetic.annotate import truth_mask
from ips.synthetic.families import family

METHODS = ("random", "suggest")


def read_rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as f:
        return list(csv.DictReader(f))


def write_annotated(manifest: Path, annotated: list[str], out: Path, min_fraction: float) -> Path:
    """`manifest` plus an `annotation` column: a truth mask (`<store>.annotation.npy`) for `annotated`."""
    rows = read_rows(manifest)
    for row in rows:
        row["annotation"] = ""
        if row["slide_id"] in annotated:
            store = manifest.parent / row["path"]
            mask_path = store.with_suffix(".annotation.npy")
            if not mask_path.is_file():
                np.save(mask_path, truth_mask(store, "lesion", min_fraction))
            row["annotation"] = str(mask_path.relative_to(manifest.parent))
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def start_set(train: list[str], seed: int, k: int) -> list[str]:
    """The `k` training slides annotated before the first round (the same for both methods)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    return [train[i] for i in rng.permutation(len(train))[:k]]


def random_stream(seed: int) -> np.random.Generator:
    """The random arm's picks: a stream of its own (not the start set's, nor another seed's)."""
    return np.random.default_rng(np.random.SeedSequence([seed, 1]))


def random_picks(rng: np.random.Generator, train: list[str], annotated: list[str], k: int) -> list[str]:
    """`k` training slides not yet annotated, uniformly at random (fewer when fewer are left)."""
    left = [s for s in train if s not in annotated]
    return [left[i] for i in rng.permutation(len(left))[:k]]


def call(argv: list[str]) -> None:
    code = ips(argv)
    if code != 0:
        raise SystemExit(f"ips {' '.join(argv)}: exit {code}")


def rounds(args: argparse.Namespace, manifest: Path, seed: int, method: str) -> dict[str, Any]:
    """One method at one seed: the rounds until the target or `--max`; the row."""
    rows = read_rows(manifest)
    train = [r["slide_id"] for r in rows if r["split"] == "train"]
    annotated = start_set(train, seed, args.start)
    pick = random_stream(seed)
    run = args.out / f"seed{seed}" / method
    shutil.rmtree(run, ignore_errors=True)
    history = []
    threads = ["--threads", str(args.threads), "--quiet"]
    while True:
        k = len(annotated)
        # the first round is the same for both methods (same slides, same seed): trained once, shared
        step = run.parent / "start" if k == args.start else run / f"n{k}"
        m = write_annotated(
            manifest, annotated, manifest.parent / f"manifest_{method}_n{k}.csv", args.min_fraction
        )
        ckpt = step / "train" / "checkpoints" / "best.pt"
        pos = [r for r in rows if r["split"] == "test" and r["label"] == "1"]
        if not (step / "done").is_file():
            overrides = [f"train.seed={seed}", *([f"train.epochs={args.epochs}"] if args.epochs else [])]
            call(["train", "--config", str(args.config), "--manifest", str(m), "--out", str(step / "train"),
                  *threads, *overrides])  # fmt: skip
            call(["predict", "--checkpoint", str(ckpt), "--manifest", str(m), "--split", "test",
                  "--out", str(step / "pred"), *threads])  # fmt: skip
            stores = [str(manifest.parent / r["path"]) for r in pos]
            call(["heatmap", "--checkpoint", str(ckpt), *stores, "--out", str(step / "heat"), "--top-k", "0",
                  *threads])  # fmt: skip
            (step / "done").write_text("")
        metrics = json.loads((step / "pred" / "metrics.json").read_text())["metrics"]
        auroc = float(np.nanmean([heatmap_auroc(step / "heat" / r["slide_id"] / "scores.zarr",
                                                manifest.parent / r["path"]) for r in pos]))  # fmt: skip
        accuracy = float(metrics["label/accuracy"])
        history.append(
            {"annotated": k, "test_accuracy": accuracy, "heatmap_auroc": auroc, "slides": list(annotated)}
        )
        print(f"seed {seed} {method}: {k} annotated -> accuracy {accuracy:.3f}, heatmap AUROC {auroc:.3f}")
        if accuracy >= args.accuracy and auroc >= args.auroc:
            return {"seed": seed, "method": method, "annotated_needed": k, "history": history}
        left = [s for s in train if s not in annotated]
        if k + args.step > args.max or not left:
            return {"seed": seed, "method": method, "annotated_needed": None, "history": history}
        if method == "random":
            annotated += random_picks(pick, train, annotated, args.step)
        else:
            call(["suggest", "--checkpoint", str(ckpt), "--manifest", str(m), "--split", "train",
                  "--budget", str(args.step), "--out", str(step / "suggest"), *threads])  # fmt: skip
            annotated += [r["slide_id"] for r in read_rows(step / "suggest" / "suggestions.csv")]


def table(result: dict[str, Any]) -> str:
    lines = ["| seed | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for seed in result["seeds"]:
        cells = []
        for method in METHODS:
            row = next(r for r in result["rows"] if r["seed"] == seed and r["method"] == method)
            cells.append(
                str(row["annotated_needed"]) if row["annotated_needed"] is not None else f"> {result['max']}"
            )
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves(result: dict[str, Any]) -> str:
    """Test accuracy / heatmap AUROC after each round, one row per seed and method."""
    ks = sorted({h["annotated"] for r in result["rows"] for h in r["history"]})
    lines = ["| seed | method | " + " | ".join(f"{k} annotated" for k in ks) + " | slides needed |",
             "|---|---|" + "---|" * (len(ks) + 1)]  # fmt: skip
    for r in result["rows"]:
        at = {h["annotated"]: f"{h['test_accuracy']:.3f} / {h['heatmap_auroc']:.3f}" for h in r["history"]}
        need = str(r["annotated_needed"]) if r["annotated_needed"] is not None else f"> {result['max']}"
        lines.append(
            f"| {r['seed']} | {r['method']} | " + " | ".join(at.get(k, "") for k in ks) + f" | {need} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="a", help="task family (ips.synthetic.families; default a)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--digits", type=Path, help="MNIST CSV for the marks families (b, c, f)")
    p.add_argument("--n-slides", type=int, help="slides per data set (default: the family's)")
    p.add_argument("--start", type=int, default=8, help="training slides annotated before the first round")
    p.add_argument("--step", type=int, default=8, help="slides annotated per round")
    p.add_argument("--max", type=int, default=64, help="stop when this many would be exceeded")
    p.add_argument("--accuracy", type=float, default=0.95)
    p.add_argument("--auroc", type=float, default=0.95)
    p.add_argument("--min-fraction", type=float, default=0.25, help="as `ips synth annotate`")
    p.add_argument("--epochs", type=int, help="train.epochs (default: the config's)")
    p.add_argument(
        "--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    fam = family(args.family)
    seeds = [int(s) for s in args.seeds.split(",")]
    result: dict[str, Any] = {"family": args.family, "seeds": seeds, "max": args.max, "rows": [],
                              "settings": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    for seed in seeds:
        data = args.out / f"seed{seed}" / "data"
        manifest = data / "manifest.csv"
        if not manifest.is_file():
            manifest = fam.generate(data, args.n_slides or fam.default_slides, seed=seed, digits=args.digits)
        shutil.rmtree(args.out / f"seed{seed}" / "start", ignore_errors=True)  # not from another setting
        for method in METHODS:
            result["rows"].append(rounds(args, manifest, seed, method))
            if args.json:  # after every row: an interrupted run keeps what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(curves(result))


if __name__ == "__main__":
    main()
