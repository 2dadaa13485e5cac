"""`ips suggest`: the score components on numbers worked out by hand, the greedy ranking, and the
command end to end checked against each model run on each store by hand (attention, logits, encoder)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from inference_fixtures import BINARY, MULTICLASS, make_store, tiny_cfg, write_checkpoint

from ips.cli.main import main
from ips.data.manifest import SlideRecord
from ips.data.open import make_source
from ips.data.store import open_store
from ips.infer.engine import infer_slide
from ips.infer.suggest import (
    Candidate,
    attention_entropy,
    categorical,
    cosine_novelty,
    rank_slides,
    region_scores,
    top_regions,
    uncertainty_and_disagreement,
)
from ips.model.checkpoint import load_model


def h2(p: float) -> float:
    """Binary entropy in bits."""
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


# -- the components on known numbers --------------------------------------------------------------------


def test_uncertainty_and_disagreement_of_two_binary_runs():
    """Runs say 0.2 and 0.8: the mean 0.5 is as uncertain as can be (1); the runs disagree by
    1 - H2(0.2) bits (0.2781)."""
    u, d = uncertainty_and_disagreement([categorical("binary", np.array([0.2, 0.8]))])
    assert u == pytest.approx(1.0)
    assert d == pytest.approx(1 - h2(0.2)) and d == pytest.approx(0.278072, abs=1e-6)
    u, d = uncertainty_and_disagreement([categorical("binary", np.array([0.9, 0.9]))])
    assert u == pytest.approx(h2(0.9)) and d == pytest.approx(0.0, abs=1e-12)


def test_uncertainty_of_multiclass_and_multilabel_and_the_mean_over_tasks():
    sure = categorical("multiclass", np.array([[1.0, 0.0, 0.0, 0.0]]))
    flat = categorical("multiclass", np.array([[0.25, 0.25, 0.25, 0.25]]))
    assert uncertainty_and_disagreement([sure]) == (0.0, 0.0)
    assert uncertainty_and_disagreement([flat])[0] == pytest.approx(1.0)
    # multilabel: one binary distribution per label, averaged: labels at 0.5 and 1.0 -> (1 + 0) / 2
    tags = categorical("multilabel", np.array([[0.5, 1.0]]))
    assert tags.shape == (1, 2, 2) and uncertainty_and_disagreement([tags])[0] == pytest.approx(0.5)
    # two tasks weigh the same whatever their number of labels: (1 + 0.5) / 2
    assert uncertainty_and_disagreement([flat, tags])[0] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="task kind 'regression'"):
        categorical("regression", np.array([1.0]))


def test_attention_entropy_on_known_maps():
    n = 8
    uniform = np.full((1, n, 1), 1 / n)
    peak = np.zeros((1, n, 1))
    peak[0, 3, 0] = 1
    half = np.zeros((1, n, 1))
    half[0, :2, 0] = 0.5
    assert attention_entropy(uniform) == pytest.approx(1.0)
    assert attention_entropy(peak) == 0.0
    assert attention_entropy(half) == pytest.approx(math.log(2) / math.log(8))  # 1/3
    # the mean over runs and tasks
    both = np.concatenate([uniform, peak], axis=0)  # 2 runs
    assert attention_entropy(both) == pytest.approx(0.5)
    assert attention_entropy(np.ones((1, 1, 1))) == 0.0


def test_cosine_novelty():
    e = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    ref = np.array([[0.0, 1.0], [-1.0, 0.0]])
    # [1,0]: cos 0 with [0,1] -> 0.5, cos -1 with [-1,0] -> 1: min 0.5; [0,2]: same as ref 0 -> 0;
    # [3,3]: cos 1/sqrt2 with [0,1] -> (1 - 0.7071) / 2
    assert cosine_novelty(e, ref) == pytest.approx([0.5, 0.0, (1 - 1 / math.sqrt(2)) / 2])
    assert cosine_novelty(e, np.zeros((0, 2))).tolist() == [1.0, 1.0, 1.0]


def _cand(sid, u, d, a, e):
    return Candidate(sid, u, d, a, np.asarray(e, dtype=np.float64))


def test_ranking_is_greedy_with_novelty_and_respects_the_budget():
    """a and b look alike and are the most uncertain; c is less uncertain and unlike them; d is
    like the annotated slide. With novelty, a first, then c (b's novelty fell to 0 when a was picked)."""
    cands = [
        _cand("a", 0.9, 0.0, 0.0, [1, 0, 0]),
        _cand("b", 0.9, 0.0, 0.0, [1, 0, 0]),
        _cand("c", 0.5, 0.0, 0.0, [0, 1, 0]),
        _cand("d", 0.95, 0.0, 0.0, [0, 0, 1]),
    ]
    annotated = np.array([[0.0, 0.0, 1.0]])
    ranked = rank_slides(cands, annotated, budget=3, centre=False)
    # step 1: novelty vs annotated: a 0.5, b 0.5, c 0.5, d 0 -> totals 1.4, 1.4, 1.0, 0.95 -> a (first tie)
    # step 2: vs {annotated, a}: b 0, c 0.5, d 0 -> 0.9, 1.0, 0.95 -> c
    # step 3: vs {annotated, a, c}: b 0, d 0 -> 0.9, 0.95 -> d
    assert [(r.slide_id, r.rank) for r in ranked] == [("a", 1), ("c", 2), ("d", 3)]
    assert [r.score for r in ranked] == pytest.approx([1.4, 1.0, 0.95])
    assert [r.novelty for r in ranked] == pytest.approx([0.5, 0.5, 0.0])
    # without novelty: by uncertainty alone; the budget cuts the list
    plain = rank_slides(cands, annotated, budget=2, use=("uncertainty",))
    assert [r.slide_id for r in plain] == ["d", "a"]
    assert len(rank_slides(cands, annotated, budget=10, centre=False)) == 4
    with pytest.raises(ValueError, match="unknown score component 'luck'"):
        rank_slides(cands, annotated, budget=1, use=("luck",))


def test_centred_novelty_ignores_what_every_slide_shares():
    """A large vector common to every embedding leaves the centred novelty as it was: the ranking of
    embeddings `e + c` with centring equals that of `e - mean(e)` without."""
    rng = np.random.default_rng(0)
    e = rng.normal(size=(6, 4))
    annotated = rng.normal(size=(2, 4))
    common = np.array([50.0, -20.0, 30.0, 10.0])
    shifted = [_cand(f"s{i}", 0.1 * i, 0.0, 0.0, e[i] + common) for i in range(6)]
    mean = np.concatenate([e, annotated]).mean(axis=0)
    by_hand = [_cand(f"s{i}", 0.1 * i, 0.0, 0.0, e[i] - mean) for i in range(6)]
    got = rank_slides(shifted, annotated + common, budget=4)
    want = rank_slides(by_hand, annotated - mean, budget=4, centre=False)
    assert [r.slide_id for r in got] == [r.slide_id for r in want]
    assert [r.novelty for r in got] == pytest.approx([r.novelty for r in want])
    uncentred = rank_slides(shifted, annotated + common, budget=4, centre=False)
    assert max(r.novelty for r in uncentred) < 0.01  # what centring is for: all near-parallel


def test_region_scores_and_top_regions():
    """Two runs, four patches, one task: N a = [2, 1, 1, 0] and [0, 1, 1, 2] -> mean 1, 1, 1, 1 and
    sd 1, 0, 0, 1 -> scores 2, 1, 1, 2; best first, ties to the lower index: 0, 3, 1."""
    a = np.array([[0.5, 0.25, 0.25, 0.0], [0.0, 0.25, 0.25, 0.5]])[:, :, None]
    assert region_scores(a) == pytest.approx([2.0, 1.0, 1.0, 2.0])
    assert top_regions(region_scores(a), 3).tolist() == [0, 3, 1]


# -- the command end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Six small stores, two untrained checkpoints (seeds 0 and 1) of a binary and a multiclass task,
    and a manifest in which s5 is annotated."""
    root = tmp_path_factory.mktemp("suggest")
    for i in range(6):
        make_store(root / "stores", f"s{i}", size=(64, 48), patch=16, seed=i, fill=0.3 + 0.1 * i)
    cfg = tiny_cfg(tasks=[BINARY, MULTICLASS], memory_size=3, iter_size=5)
    runs = root / "runs"
    ckpts = [write_checkpoint(root / f"seed_{s}.pt", cfg, seed=s) for s in (0, 1)]
    for s, c in zip((0, 1), ckpts, strict=True):  # the same checkpoints as a seeds run folder
        (runs / f"seed_{s}" / "checkpoints").mkdir(parents=True)
        (runs / f"seed_{s}" / "checkpoints" / "best.pt").write_bytes(c.read_bytes())
    (root / "s5.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    manifest = root / "manifest.csv"
    lines = ["slide_id,path,a,b,split,annotation"]
    lines += [f"s{i},stores/s{i}.zarr,{i % 2},{i % 3},train," for i in range(5)]
    lines += ["s5,stores/s5.zarr,1,0,train,s5.geojson"]
    manifest.write_text("\n".join(lines) + "\n")
    return {"root": root, "cfg": cfg, "ckpts": ckpts, "runs": runs, "manifest": manifest}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _mean_content(ckpt, store, cfg) -> np.ndarray:
    """The mean content embedding of every patch of a store, by the encoder run by hand."""
    model, _ = load_model(ckpt)
    source = make_source(SlideRecord("x", str(store)), cfg)
    with torch.no_grad():
        content = model.embed_content(source.read(np.arange(len(source))))
    return content.double().mean(dim=0).numpy()


def test_suggest_against_each_model_run_by_hand(cohort, tmp_path, capsys):
    out = tmp_path / "sug"
    args = ["suggest", "--checkpoint", str(cohort["runs"]), "--manifest", str(cohort["manifest"])]
    assert main([*args, "--budget", "3", "--out", str(out), "--regions", "2", "--quiet"]) == 0
    assert "3 of 5 unannotated slides suggested (2 run(s), 1 annotated" in capsys.readouterr().out
    rows = _rows(out / "suggestions.csv")
    assert list(rows[0])[:3] == ["slide_id", "score", "rank"]  # the contract
    assert [int(r["rank"]) for r in rows] == [1, 2, 3]  # the budget, best first
    assert "s5" not in {r["slide_id"] for r in rows}  # annotated: never suggested

    # the oracle, one run at a time: each model on each store by `infer_slide` (attention of every patch
    # and the top-M logits), probabilities by sigmoid / softmax here
    probs: dict[tuple[str, str], list] = {}
    attention: dict[str, list] = {}
    stores = cohort["root"] / "stores"
    for ckpt in cohort["ckpts"]:
        model, _ = load_model(ckpt)
        for i in range(6):
            source = make_source(SlideRecord(f"s{i}", str(stores / f"s{i}.zarr")), cohort["cfg"])
            inf = infer_slide(model, source, memory_size=3, iter_size=5)
            logits = inf.logits["topm"]
            probs.setdefault((f"s{i}", "a"), []).append([float(torch.sigmoid(logits["a"][0]))])
            probs.setdefault((f"s{i}", "b"), []).append(torch.softmax(logits["b"].double(), 0).tolist())
            attention.setdefault(f"s{i}", []).append(inf.attention.astype(np.float64))

    def entropy(p):
        p = np.asarray(p, dtype=np.float64)
        return float(-(p[p > 0] * np.log(p[p > 0])).sum())

    def expected(sid):
        pa = [c[0] for c in probs[(sid, "a")]]  # binary: P(positive) per run
        pb = probs[(sid, "b")]  # multiclass: 3 probabilities per run
        ua = h2(float(np.mean(pa)))
        da = ua - np.mean([h2(p) for p in pa])
        ub = entropy(np.mean(pb, axis=0)) / math.log(3)
        db = ub - np.mean([entropy(p) for p in pb]) / math.log(3)
        att = attention[sid]  # per run (N, T)
        n = att[0].shape[0]
        ent = np.mean([entropy(a[:, t]) / math.log(n) for a in att for t in range(a.shape[1])])
        return (ua + ub) / 2, (da + db) / 2, ent

    for r in rows:
        u, d, e = expected(r["slide_id"])
        assert float(r["uncertainty"]) == pytest.approx(u, abs=1e-4)
        assert float(r["disagreement"]) == pytest.approx(d, abs=1e-4)
        assert float(r["attention_entropy"]) == pytest.approx(e, abs=1e-4)
        total = float(r["uncertainty"]) + float(r["disagreement"]) + float(r["attention_entropy"])
        assert float(r["score"]) == pytest.approx(total + float(r["novelty"]), abs=2e-5)

    # novelty of the first pick: against the annotated s5 only, embeddings by the encoder by hand
    emb = {
        f"s{i}": np.mean(
            [_mean_content(c, stores / f"s{i}.zarr", cohort["cfg"]) for c in cohort["ckpts"]], axis=0
        )
        for i in range(6)
    }

    centre = np.mean(list(emb.values()), axis=0)  # over the 5 candidates and the annotated s5
    emb = {k: v - centre for k, v in emb.items()}

    def novelty(sid, ref):
        a = emb[sid]
        return min((1 - a @ emb[x] / np.linalg.norm(a) / np.linalg.norm(emb[x])) / 2 for x in ref)

    first = rows[0]["slide_id"]
    assert float(rows[0]["novelty"]) == pytest.approx(novelty(first, ["s5"]), abs=1e-4)
    assert float(rows[1]["novelty"]) == pytest.approx(novelty(rows[1]["slide_id"], ["s5", first]), abs=1e-4)
    # the first pick has the highest score of all five candidates at that step
    for i in range(5):
        u, d, e = expected(f"s{i}")
        assert float(rows[0]["score"]) >= u + d + e + novelty(f"s{i}", ["s5"]) - 1e-4

    # the regions: QuPath GeoJSON rectangles of the best region scores, in level-0 pixels [x, y]
    geo = json.loads((out / rows[0]["regions"]).read_text())
    assert rows[0]["regions"] == f"regions/{first}.geojson"
    feats = geo["features"]
    assert len(feats) == 2 and [f["properties"]["rank"] for f in feats] == [1, 2]
    level0 = open_store(stores / f"{first}.zarr").coords("default")  # grid at level 0: level-0 pixels
    rel = np.stack([a.shape[0] * a.mean(axis=1) for a in attention[first]])  # (R, N)
    region = rel.mean(axis=0) + rel.std(axis=0)
    best = sorted(range(len(region)), key=lambda i: (-region[i], i))[:2]
    for f, i in zip(feats, best, strict=True):
        row, col = level0[i]
        assert f["properties"]["patch"] == i
        assert f["geometry"]["coordinates"][0] == [
            [col, row], [col + 16, row], [col + 16, row + 16], [col, row + 16], [col, row]
        ]  # fmt: skip
        assert f["properties"]["classification"]["name"] == "IPS suggestion"
        assert f["properties"]["objectType"] == "annotation"


def test_single_checkpoint_has_no_disagreement_and_the_budget_can_exceed_the_candidates(cohort, tmp_path):
    out = tmp_path / "one"
    argv = ["suggest", "--checkpoint", str(cohort["ckpts"][0]), "--manifest", str(cohort["manifest"])]
    assert (
        main([*argv, "--budget", "50", "--out", str(out), "--by", "uncertainty,disagreement", "--quiet"]) == 0
    )
    rows = _rows(out / "suggestions.csv")
    assert len(rows) == 5 and {r["slide_id"] for r in rows} == {f"s{i}" for i in range(5)}
    assert all(float(r["disagreement"]) == 0 for r in rows)
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)  # without novelty the greedy order is the score order
    assert all(float(r["score"]) == pytest.approx(float(r["uncertainty"]), abs=1e-5) for r in rows)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budget", "0"], "--budget must be >= 1"),
        (["--budget", "2", "--by", "luck"], "--by: unknown component 'luck'"),
        (["--budget", "2", "--checkpoint", "nowhere.pt"], "no such file or folder"),
    ],
)
def test_bad_usage_exits_2(cohort, tmp_path, capsys, extra, message):
    argv = ["suggest", "--checkpoint", str(cohort["ckpts"][0]), "--manifest", str(cohort["manifest"])]
    assert main([*argv, "--out", str(tmp_path / "x"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_checkpoint_given_twice_and_one_of_other_tasks_are_refused(cohort, tmp_path, capsys):
    ckpt = str(cohort["ckpts"][0])
    argv = ["suggest", "--manifest", str(cohort["manifest"]), "--budget", "1", "--out", str(tmp_path / "x")]
    assert main([*argv, "--checkpoint", ckpt, "--checkpoint", cohort["runs"].as_posix()]) == 0  # a copy
    assert main([*argv, "--checkpoint", ckpt, "--checkpoint", ckpt]) == 2
    assert "is given twice" in capsys.readouterr().err
    other = write_checkpoint(tmp_path / "other.pt", tiny_cfg(tasks=[BINARY], memory_size=3, iter_size=5))
    assert main([*argv, "--checkpoint", ckpt, "--checkpoint", str(other)]) == 2
    assert "its tasks differ" in capsys.readouterr().err


def test_a_failing_store_is_named_and_the_others_are_still_ranked(cohort, tmp_path, capsys):
    broken = cohort["root"] / "broken.zarr"
    broken.mkdir(exist_ok=True)  # a folder, not a complete store
    manifest = tmp_path / "m.csv"
    manifest.write_text(cohort["manifest"].read_text().replace("s4,stores/s4.zarr", f"s4,{broken}"))
    manifest = manifest.rename(cohort["root"] / "with_broken.csv")  # relative store paths still resolve
    out = tmp_path / "o"
    argv = ["suggest", "--checkpoint", str(cohort["ckpts"][0]), "--manifest", str(manifest), "--quiet"]
    assert main([*argv, "--budget", "10", "--out", str(out)]) == 1
    assert "ips suggest: failed: s4 (" in capsys.readouterr().err
    assert sorted(r["slide_id"] for r in _rows(out / "suggestions.csv")) == ["s0", "s1", "s2", "s3"]


def test_split_keeps_other_splits_out_of_the_candidates_and_the_novelty_reference(cohort, tmp_path, capsys):
    """`--split train` (how the suggest-vs-random harness asks): slides of other splits are never
    suggested, and annotated slides of other splits are not what novelty compares with (nothing to
    compare with: novelty 1 at rank 1)."""
    splits = {"s0": "train", "s1": "train", "s2": "train", "s3": "test", "s4": "val", "s5": "test"}
    lines = cohort["manifest"].read_text().splitlines()
    rows = [lines[0]] + [ln.replace(",train,", f",{splits[ln.split(',')[0]]},") for ln in lines[1:]]
    manifest = cohort["root"] / "splits.csv"  # beside the stores: relative paths resolve
    manifest.write_text("\n".join(rows) + "\n")
    argv = ["suggest", "--checkpoint", str(cohort["ckpts"][0]), "--manifest", str(manifest), "--quiet"]
    out = tmp_path / "tr"
    assert main([*argv, "--split", "train", "--budget", "10", "--out", str(out), "--by", "novelty"]) == 0
    assert "3 of 3 unannotated slides suggested (1 run(s), 0 annotated slides" in capsys.readouterr().out
    got = _rows(out / "suggestions.csv")
    assert sorted(r["slide_id"] for r in got) == ["s0", "s1", "s2"]
    assert float(got[0]["novelty"]) == 1.0
    # the control: the annotated slide in the same split is compared with, and suggests nothing itself
    manifest.write_text(manifest.read_text().replace(",test,s5", ",train,s5"))
    out = tmp_path / "tr2"
    assert main([*argv, "--split", "train", "--budget", "10", "--out", str(out), "--by", "novelty"]) == 0
    assert "3 of 3 unannotated slides suggested (1 run(s), 1 annotated slides" in capsys.readouterr().out
    got = _rows(out / "suggestions.csv")
    assert sorted(r["slide_id"] for r in got) == ["s0", "s1", "s2"] and float(got[0]["novelty"]) < 1.0
