"""The selection cascade: coarse top-K, then exact top-M among the candidates.

Oracles are brute force and independent of the streaming code: the coarse scorer and the full model are
run on every patch at once, and the expected result is a sort by (score descending, index ascending).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr
from train_fixtures import make_cross_slides, tiny_config

from ips.algo.cascade import (
    CANDIDATE_FLOOR,
    CascadeSettings,
    SubsetSource,
    candidate_recall,
    cascade_select,
    distill_loss,
)
from ips.algo.selection import eval_mode
from ips.config import ConfigError, ModelConfig, SelectionConfig, TaskConfig, with_overrides
from ips.data.coarse import PooledView, PyramidView, coarse_view
from ips.data.sources import InMemoryPatchSource, iter_chunks
from ips.data.zarr_source import ZarrPatchSource
from ips.infer.engine import Predictor, Selector
from ips.model.coarse import CoarseScorer, attach_coarse_scorer
from ips.model.ips_model import build_model
from ips.runtime import Runtime
from ips.training.distill import ExploringCascade


def _model(dims: int, patch: int, *, pos_enc: str = "sincos", seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        encoder="ips_cnn_tiny",
        encoder_norm="group",
        in_chans=1,
        spatial_dims=dims,
        patch_size=patch,
        d_model=16,
        n_heads=2,
        d_mlp=16,
        pos_enc=pos_enc,
        tasks=(TaskConfig(name="y", kind="binary"),),
    )
    model = build_model(cfg)
    attach_coarse_scorer(model, width=4)
    return model.eval()


def _bag(n: int, dims: int, patch: int, *, distinct: int | None = None, seed: int = 0):
    """n random uint8 patches `(n, 1, *[patch] * dims)`; `distinct`: only that many different ones
    (patch i is patch i % distinct), for exact ties."""
    g = torch.Generator().manual_seed(seed)
    k = n if distinct is None else distinct
    base = torch.randint(0, 256, (k, 1, *([patch] * dims)), generator=g, dtype=torch.uint8)
    patches = base[torch.arange(n) % k]
    side = int(np.ceil(n ** (1 / dims)))
    pos = np.stack(np.unravel_index(np.arange(n), (side,) * dims), axis=1)
    return InMemoryPatchSource(patches, pos, record_reads=True)


def _ranked(scores: torch.Tensor, k: int) -> np.ndarray:
    """Brute-force top-k: indices sorted by (score descending, index ascending)."""
    values = scores.detach().tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return np.asarray(order[:k], dtype=np.int64)


@torch.no_grad()
def _oracle(model, source, coarse, m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(candidates ascending, selection best first): every patch through the coarse scorer, then every
    candidate through the full model, each all at once."""
    n = len(source)
    all_idx = np.arange(n)
    coarse_scores = model.coarse_scorer(coarse.read(all_idx))
    candidates = np.sort(_ranked(coarse_scores, k))
    pos = torch.from_numpy(source.positions()[candidates])
    fine = model.selection_scores(model.embed(source.read(candidates), pos)[None])[0]
    return candidates, candidates[_ranked(fine, m)]


def _shuffled(seed: int):
    def stream(source, size):
        return iter_chunks(source, size, order=np.random.default_rng(seed).permutation(len(source)))

    return stream


@pytest.mark.parametrize(
    "dims,patch,n,m,i,share,order,distinct",
    [
        (2, 16, 300, 5, 7, 0.1, None, None),
        (2, 16, 300, 8, 64, 0.25, 1, None),
        (2, 16, 257, 1, 3, 40.0, 2, None),  # a count
        (2, 16, 300, 6, 16, 0.2, 3, 17),  # exact ties in both stages
        (2, 8, 200, 3, 50, 0.5, None, None),
        (3, 8, 120, 4, 9, 0.3, 4, None),
        (3, 8, 120, 2, 32, 0.1, None, 11),
    ],
)
def test_cascade_equals_ips_restricted_to_the_candidates(dims, patch, n, m, i, share, order, distinct):
    pos_enc = "none" if distinct else "sincos"  # ties need equal positions' codes too
    model = _model(dims, patch, pos_enc=pos_enc)
    source = _bag(n, dims, patch, distinct=distinct)
    settings = CascadeSettings(share, 4)
    coarse = coarse_view(source, 4)
    k = settings.count(n, m)
    assert m * CANDIDATE_FLOOR <= k < n
    want_candidates, want = _oracle(model, source, coarse, m, k)
    stream = iter_chunks if order is None else _shuffled(order)
    with eval_mode(model):
        run = cascade_select(
            model, source, coarse, memory_size=m, iter_size=i, settings=settings, stream=stream
        )
    assert np.array_equal(run.candidates, want_candidates)
    assert np.array_equal(run.selection.indices.numpy(), want)
    # the selection carries the patches and positions of those indices
    assert torch.equal(run.selection.patches, source.patches[torch.from_numpy(want)])
    assert np.array_equal(run.selection.positions.numpy(), source.positions()[want])


def test_cascade_reads_each_candidate_once_in_chunks_of_at_most_i():
    """Memory: the coarse pass reads every patch once and the fine pass each candidate once, never more
    than I full-resolution patches per read (a pooled view reads full patches)."""
    n, m, i = 300, 4, 20
    model, source = _model(2, 16), _bag(n, 2, 16)
    settings = CascadeSettings(0.1, 4)
    with eval_mode(model):
        run = cascade_select(
            model, source, coarse_view(source, 4), memory_size=m, iter_size=i, settings=settings
        )
    reads = source.reads
    assert max(len(r) for r in reads) <= i
    everything = np.concatenate(reads)
    k = settings.count(n, m)
    assert len(everything) == n + k
    counts = np.bincount(everything, minlength=n)
    assert set(np.flatnonzero(counts == 2)) == set(run.candidates.tolist())
    assert counts.min() == 1


def test_cascade_without_pruning_is_the_full_pass():
    model, source = _model(2, 16), _bag(40, 2, 16)
    with eval_mode(model):
        run = cascade_select(
            model,
            source,
            coarse_view(source, 4),
            memory_size=10,
            iter_size=8,
            settings=CascadeSettings(0.5, 4),  # 20 < 4 M = 40: every patch is a candidate
        )
        pos = torch.from_numpy(source.positions())
        fine = model.selection_scores(model.embed(source.patches, pos)[None])[0]
    assert np.array_equal(run.candidates, np.arange(40))
    assert np.array_equal(run.selection.indices.numpy(), _ranked(fine, 10))


def test_candidate_count():
    s = CascadeSettings(0.1, 4)
    assert s.count(10_000, 8) == 1000
    assert s.count(100, 8) == 32  # the floor, 4 M
    assert s.count(20, 8) == 20  # never above N
    assert CascadeSettings(250.0, 4).count(10_000, 8) == 250
    assert CascadeSettings(1.0, 4).count(999, 8) == 999
    with pytest.raises(ValueError):
        CascadeSettings(0.0, 4)


def test_candidate_recall():
    assert candidate_recall([3, 5, 7, 9], [1, 3, 5, 11, 9]) == 0.75
    assert candidate_recall([3, 5], [3, 5]) == 1.0
    assert candidate_recall([3, 5], []) == 0.0
    assert candidate_recall([], [1]) == 1.0
    assert candidate_recall(np.array([2, 2, 4]), np.array([2])) == 0.5  # repeats count once


def test_subset_source_maps_indices():
    source = _bag(30, 2, 8)
    subset = SubsetSource(source, np.array([2, 5, 11, 29]))
    assert len(subset) == 4
    assert torch.equal(subset.read(np.array([3, 0])), source.patches[[29, 2]])
    assert np.array_equal(subset.positions(), source.positions()[[2, 5, 11, 29]])
    with pytest.raises(ValueError, match="ascending"):
        SubsetSource(source, np.array([5, 2]))


def test_pooled_view_is_the_block_mean():
    x = torch.arange(2 * 16, dtype=torch.uint8).reshape(2, 1, 4, 4) * 7
    view = PooledView(InMemoryPatchSource(x), 2)
    got = view.read(np.array([1, 0]))
    want = x.double().reshape(2, 1, 2, 2, 2, 2).mean(dim=(3, 5))[[1, 0]]  # (n, C, 2, 2)
    assert got.dtype == torch.uint8 and got.shape == (2, 1, 2, 2)
    assert torch.equal(got, torch.floor(want + 0.5).to(torch.uint8))
    with pytest.raises(ValueError, match="divide"):
        PooledView(InMemoryPatchSource(x), 3)
    with pytest.raises(ValueError, match="pixel"):
        PooledView(InMemoryPatchSource(torch.zeros(3, 5)), 2)


def test_pyramid_view_reads_the_stores_coarse_level(tmp_path):
    """A store with a pyramid: the view reads level 2 (4x) at the grid's corners / 4, as zarr does."""
    from data_prep.convert import PrepOptions, convert_array

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(3, 256, 192), dtype=np.uint8)
    opts = PrepOptions(patch_size=32, min_tissue=0.0, thumbnail=False, hash_source=False, pyramid_max_size=32)
    store = convert_array(img, tmp_path, "s", options=opts, mask=np.ones((256, 192), dtype=bool))
    source = ZarrPatchSource(store, read_threads=2)
    view = coarse_view(source, 4)
    assert isinstance(view, PyramidView) and view.level == 2 and view.scale == 16
    assert view.patch_shape == (3, 8, 8) and len(view) == len(source)
    level2 = zarr.open_array(str(store / "2"), mode="r")[...]
    idx = np.array([len(source) - 1, 0, 7, 3])
    got = view.read(idx).numpy()
    for j, (r, c) in enumerate(source.coords[idx] // 4):
        assert np.array_equal(got[j], level2[:, r : r + 8, c : c + 8])
    # the same pixels as pooling the full-resolution patches (the pyramid rounds twice: within 1)
    pooled = PooledView(source, 4).read(idx).numpy().astype(int)
    assert np.abs(pooled - got.astype(int)).max() <= 1


def test_pyramid_view_of_a_volume(tmp_path):
    """3D: a volume whose z halves with y and x: level 2 is 4x on every axis."""
    from data_prep.convert import PrepOptions, convert_array

    rng = np.random.default_rng(1)
    vol = rng.integers(0, 256, size=(1, 32, 64, 48), dtype=np.uint8)
    opts = PrepOptions(patch_size=16, min_tissue=0.0, thumbnail=False, hash_source=False, pyramid_max_size=8)
    store = convert_array(vol, tmp_path, "v", options=opts, mask=np.ones((32, 64, 48), dtype=bool))
    source = ZarrPatchSource(store, read_threads=1)
    view = coarse_view(source, 4)
    assert isinstance(view, PyramidView) and view.level == 2 and view.patch_shape == (1, 4, 4, 4)
    level2 = zarr.open_array(str(store / "2"), mode="r")[...]
    idx = np.arange(len(source))[::-1]
    got = view.read(idx).numpy()
    for j, (z, r, c) in enumerate(source.coords[idx] // 4):
        assert np.array_equal(got[j], level2[:, z : z + 4, r : r + 4, c : c + 4])


def test_selector_runs_the_cascade_and_predictor_heatmaps_the_full_pass():
    model, source = _model(2, 16), _bag(200, 2, 16)
    settings = CascadeSettings(0.2, 4)
    selector = Selector(4, 16, stream=iter_chunks, cascade=settings)
    with eval_mode(model):
        run = cascade_select(
            model, source, coarse_view(source, 4), memory_size=4, iter_size=16, settings=settings
        )
    assert torch.equal(selector(model, source).indices, run.selection.indices)
    # heatmaps need every patch: `infer` runs the full pass whatever the cascade
    full = Selector(4, 16, stream=iter_chunks)
    inference = Predictor(model, selector).infer(source)
    assert np.array_equal(inference.selected, full(model, source).indices.numpy())
    assert np.isfinite(inference.head_logits).all()


def test_selector_refuses_a_model_without_scorer():
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(encoder="ips_cnn_tiny", in_chans=1, patch_size=16, d_model=16, n_heads=2, d_mlp=16)
    )
    selector = Selector(4, 16, stream=iter_chunks, cascade=CascadeSettings())
    with pytest.raises(ConfigError, match="coarse scorer"):
        selector(model, _bag(100, 2, 16))


def test_from_config_switch():
    rt = Runtime(torch.device("cpu"))
    assert Selector.from_config(SelectionConfig(), rt).cascade is None
    on = Selector.from_config(SelectionConfig(cascade=True, cascade_candidates=0.3, cascade_factor=2), rt)
    assert on.cascade == CascadeSettings(0.3, 2)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("cascade_candidates", 0.0, "cascade_candidates"),
        ("cascade_candidates", 2.5, "whole count"),
        ("cascade_factor", 3, "power of two"),
        ("cascade_factor", 1, "power of two"),
        ("cascade_width", 0, "cascade_width"),
        ("cascade_explore", -1, "cascade_explore"),
        ("cascade_lr", 0.0, "cascade_lr"),
        ("cascade_warmup_epochs", -1, "cascade_warmup_epochs"),
    ],
)
def test_bad_cascade_config(key, value, match):
    from ips.config import ExperimentConfig

    with pytest.raises(ConfigError, match=match):
        with_overrides(ExperimentConfig(), selection={key: value})


def test_distill_loss_ranks_and_ignores_the_teachers_scale():
    student = torch.tensor([0.3, -1.0, 2.0, 0.5], requires_grad=True)
    teacher = torch.tensor([1.0, 0.0, 3.0, 2.0])
    a = distill_loss(student, teacher)
    assert torch.allclose(a, distill_loss(student, 5 * teacher - 7))
    a.backward()
    t = (teacher - teacher.mean()) / teacher.std()
    # d/ds of cross-entropy: softmax(student) - target
    assert torch.allclose(student.grad, torch.softmax(student.detach(), 0) - torch.softmax(t, 0), atol=1e-6)
    # the loss is lower for a student that orders the patches like the teacher
    assert distill_loss(teacher * 2, teacher) < distill_loss(-teacher * 2, teacher)


@pytest.mark.parametrize("dims", [2, 3])
def test_coarse_scorer_shapes_and_gradients(dims):
    scorer = CoarseScorer(in_chans=2, spatial_dims=dims, width=4)
    x = torch.randint(0, 256, (5, 2, *([4] * dims)), dtype=torch.uint8)
    out = scorer(x)
    assert out.shape == (5,) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in scorer.parameters())


def test_features_model_has_no_coarse_view():
    model = build_model(ModelConfig(encoder="features", feature_dim=8, d_model=8, n_heads=2, d_mlp=8))
    with pytest.raises(ValueError, match="pixels"):
        attach_coarse_scorer(model)


def test_distiller_teaches_the_scorer_the_models_ranking():
    """A few steps on one bag: the scorer's ranking of the taught patches moves towards the model's;
    the model itself is untouched and the scorer's gradients are cleared."""
    from ips.algo.cascade import distill_loss as loss_fn
    from ips.training.distill import CascadeDistiller

    model, source = _model(2, 16), _bag(80, 2, 16)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("coarse_scorer")}
    distiller = CascadeDistiller(
        model,
        SelectionConfig(cascade=True, cascade_explore=40, cascade_lr=1e-2, cascade_warmup_epochs=2),
        Runtime(torch.device("cpu")),
    )
    selector = Selector(4, 16, stream=iter_chunks, cascade=CascadeSettings(0.3, 4))
    sel = selector(model, source)
    rng = np.random.default_rng(0)
    idx, target = distiller.teacher(source, sel, np.random.default_rng(1))
    assert np.array_equal(idx[:4], sel.indices.numpy()) and len(idx) == 44

    def current() -> float:
        with torch.no_grad():
            return float(loss_fn(model.coarse_scorer(distiller.view(source).read(idx)), target))

    first = current()
    for _ in range(8):
        distiller.step([source], [sel], rng)
    assert current() < first
    assert all(p.grad is None for p in model.coarse_scorer.parameters())
    for k, v in model.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k
    # the full pass while the scorer warms up (2 epochs), the cascade after (training's explores)
    base = Selector(4, 16)
    trainer = SimpleNamespace(
        selector=base,
        predictor=SimpleNamespace(selector=base),
        cfg=SimpleNamespace(train=SimpleNamespace(seed=0)),
    )
    for epoch in (1, 2, 3, 4, 1):
        distiller.choose_selector(trainer, epoch)
        if epoch <= 2:
            assert trainer.selector.cascade is None and trainer.predictor.selector is trainer.selector
        else:
            assert isinstance(trainer.selector, ExploringCascade) and trainer.selector.draws == 40
            assert trainer.predictor.selector == dataclasses.replace(base, cascade=CascadeSettings(0.1, 4))
            assert trainer.selector.selector is trainer.predictor.selector


def test_cascade_with_extra_patches_is_ips_restricted_to_the_union():
    model, source = _model(2, 16), _bag(300, 2, 16)
    settings = CascadeSettings(0.1, 4)
    coarse = coarse_view(source, 4)
    candidates, _ = _oracle(model, source, coarse, 4, settings.count(300, 4))
    extra = np.array([299, 0, 7, 150, int(candidates[0])])  # unsorted, one already a candidate
    union = np.union1d(candidates, extra)
    assert len(union) == len(candidates) + 4
    with torch.no_grad():
        pos = torch.from_numpy(source.positions()[union])
        fine = model.selection_scores(model.embed(source.read(union), pos)[None])[0]
    seen = []
    with eval_mode(model):
        run = cascade_select(
            model,
            source,
            coarse,
            memory_size=4,
            iter_size=16,
            settings=settings,
            observe=lambda idx, content, emb: seen.append(idx.numpy()),
            extra=extra,
        )
    assert np.array_equal(run.candidates, union)
    assert np.array_equal(np.sort(np.concatenate(seen)), union)  # the fine pass saw exactly the union
    assert np.array_equal(run.selection.indices.numpy(), union[_ranked(fine, 4)])


def test_training_cascade_explores_beyond_the_candidates():
    """After the warm-up, training's fine pass (and so the novel pool that observes it) sees
    `cascade_explore` uniformly drawn patches besides the coarse candidates, the same ones for the same
    seed and epoch; the selection is top-M of that union."""
    from ips.training.distill import CascadeDistiller

    model, source = _model(2, 16), _bag(400, 2, 16)
    distiller = CascadeDistiller(
        model, SelectionConfig(cascade=True, cascade_explore=12), Runtime(torch.device("cpu"))
    )
    base = Selector(4, 16, stream=iter_chunks)
    candidates, _ = _oracle(model, source, coarse_view(source, 4), 4, CascadeSettings(0.1, 4).count(400, 4))

    def observed(seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        trainer = SimpleNamespace(
            selector=base,
            predictor=SimpleNamespace(selector=base),
            cfg=SimpleNamespace(train=SimpleNamespace(seed=seed)),
        )
        distiller.choose_selector(trainer, epoch)
        seen = []
        sel = trainer.selector(model, source, observe=lambda idx, content, emb: seen.append(idx.numpy()))
        return np.sort(np.concatenate(seen)), sel.indices.numpy()

    seen, picked = observed(0, 3)
    outside = np.setdiff1d(seen, candidates)
    assert np.isin(candidates, seen).all() and 0 < len(outside) <= 12
    assert len(seen) == len(np.union1d(candidates, outside)) and len(seen) >= len(candidates) + 12 - 4
    with torch.no_grad():
        pos = torch.from_numpy(source.positions()[seen])
        fine = model.selection_scores(model.embed(source.read(seen), pos)[None])[0]
    assert np.array_equal(picked, seen[_ranked(fine, 4)])
    assert np.array_equal(observed(0, 3)[0], seen)  # reproducible (a resumed run draws the same)
    assert not np.array_equal(observed(0, 4)[0], seen) and not np.array_equal(observed(1, 3)[0], seen)


def test_training_with_the_cascade_saves_and_loads_the_scorer(tmp_path):
    """Two epochs: the full pass while the scorer warms up, then the cascade; the scorer is saved with
    the model and loaded back with it."""
    from ips.infer.engine import load
    from ips.model.checkpoint import load_checkpoint
    from ips.training.loop import train

    manifest = make_cross_slides(tmp_path / "data", n_train=4, n_val=2)
    cfg = tiny_config(
        selection={
            "cascade": True,
            "cascade_candidates": 0.5,
            "cascade_explore": 8,
            "cascade_warmup_epochs": 1,
        },
        train={"epochs": 2, "takeoff_epoch": None},
    )
    train(cfg, manifest=manifest, run_dir=tmp_path / "run", show_progress=False, log=lambda s: None)
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    saved = load_checkpoint(ckpt)["model"]
    assert any(k.startswith("coarse_scorer.") for k in saved)
    loaded = load(ckpt, "cpu")
    assert loaded.predictor.selector.cascade == CascadeSettings(0.5, 4)
    for k, v in loaded.model.coarse_scorer.state_dict().items():
        assert torch.equal(v, saved[f"coarse_scorer.{k}"])


@pytest.mark.slow
def test_resume_with_the_cascade_equals_uninterrupted(tmp_path):
    """The scorer's weights and its optimiser's state come back: a resumed run selects as the
    uninterrupted one does, so every weight ends equal."""
    from ips.model.checkpoint import load_checkpoint
    from ips.training.loop import train

    manifest = make_cross_slides(tmp_path / "data", n_train=4, n_val=2)
    cfg = tiny_config(
        selection={"cascade": True, "cascade_candidates": 0.5, "cascade_warmup_epochs": 1},
        train={"epochs": 3, "takeoff_epoch": None},
    )
    quiet = {"show_progress": False, "log": lambda s: None}
    train(cfg, manifest=manifest, run_dir=tmp_path / "full", **quiet)
    train(cfg, manifest=manifest, run_dir=tmp_path / "cut", stop_after_epochs=2, **quiet)
    train(cfg, manifest=manifest, run_dir=tmp_path / "cut", **quiet)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert any(k.startswith("coarse_scorer.") for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
