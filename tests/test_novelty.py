"""Novelty exploration: the streaming most-novel pool equals the global one; the novel explore slots come
from it; training's exploration shows the rare patches; bad settings fail naming the key."""

import numpy as np
import pytest
import torch
from test_selection import make_case
from train_fixtures import TINY, make_cross_slides, tiny_config

from ips.algo.novelty import REFERENCE_PATCHES, NoveltyReference, reference_indices
from ips.algo.selection import Selection, eval_mode, global_top_m, select
from ips.config import ModelConfig, SelectionConfig
from ips.data.manifest import read_manifest
from ips.data.open import make_source
from ips.data.sources import InMemoryPatchSource, iter_chunks
from ips.errors import ConfigError
from ips.infer.engine import Selector
from ips.model.ips_model import build_model
from ips.runtime import Runtime
from ips.training.explore import (
    NOVEL_POOL_FACTOR,
    NovelPool,
    explore_selection,
    explore_selections,
    novel_pool_size,
)

CPU = Runtime(torch.device("cpu"))


def global_novelty(model, source, seed: int) -> torch.Tensor:
    """Novelty of every patch against the reference sample `NovelPool` draws with the same seed."""
    ref_idx = reference_indices(len(source), np.random.default_rng(seed))
    with eval_mode(model), torch.no_grad():
        ref = NoveltyReference.from_sample(model.embed_content(source.read(ref_idx)))
        return ref.scores(model.embed_content(source.read(np.arange(len(source)))))


@pytest.mark.parametrize("kind", ["2d", "3d", "features"])
@pytest.mark.parametrize("seed", range(3))
def test_streaming_novel_pool_equals_global_top(kind, seed):
    rng = np.random.default_rng(200 + seed)
    n = int(rng.integers(40, 120))
    m, i, pool = int(rng.integers(1, 10)), int(rng.integers(1, 40)), int(rng.integers(1, 30))
    model, source = make_case(kind, n, seed)
    order = rng.permutation(n)
    novel = NovelPool(model, source, pool, np.random.default_rng(seed), CPU)
    with eval_mode(model):
        plain = select(model, source, memory_size=m, iter_size=i)
        sel = select(
            model,
            source,
            memory_size=m,
            iter_size=i,
            stream=lambda s, k: iter_chunks(s, k, order=order),
            observe=novel,
        )
    assert torch.equal(novel.indices, global_top_m(global_novelty(model, source, seed), pool)), (
        n,
        m,
        i,
        pool,
    )
    assert torch.equal(sel.indices, plain.indices)  # the attention's top-M is untouched


def test_the_odd_patch_out_is_most_novel():
    # 60 patches alike (small noise around one vector) and one far from them: it ranks first
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="features", feature_dim=8, d_model=16, n_heads=2, d_mlp=8)
    model = build_model(cfg).double()
    feats = torch.randn(8, dtype=torch.float64) + 0.05 * torch.randn(61, 8, dtype=torch.float64)
    feats[37] += 3.0
    source = InMemoryPatchSource(feats, np.zeros((61, 2)))
    novel = NovelPool(model, source, 5, np.random.default_rng(1), CPU)
    Selector(4, 16)(model, source, observe=novel)
    assert novel.indices[0].item() == 37


def test_reference_sample_and_scores():
    rng = np.random.default_rng(0)
    idx = reference_indices(1000, rng)
    assert len(idx) == REFERENCE_PATCHES and len(set(idx.tolist())) == len(idx) and np.all(np.diff(idx) > 0)
    assert reference_indices(5, rng).tolist() == [0, 1, 2, 3, 4]
    # dim 1 does not vary: its scale is floored at a tenth of the mean scale (0.05), not 0
    ref = NoveltyReference.from_sample(torch.tensor([[0.0, 1.0], [2.0, 1.0]]))
    assert torch.allclose(ref.mean, torch.tensor([1.0, 1.0])) and torch.allclose(
        ref.scale, torch.tensor([1.0, 0.05])
    )
    s = ref.scores(torch.tensor([[1.0, 1.0], [3.0, 1.0], [1.0, 1.1], [float("nan"), 0.0]]))
    assert torch.allclose(s[:3], torch.tensor([0.0, 2.0, 2.0]))
    assert s[3] == float("-inf")  # a NaN embedding is never chosen


def fake_selection(source, selected) -> Selection:
    idx = np.asarray(selected)
    return Selection(
        torch.from_numpy(idx),
        torch.arange(len(idx), 0, -1).double(),
        source.read(idx),
        torch.from_numpy(source.positions()[idx]),
    )


@pytest.mark.parametrize("seed", range(5))
def test_novel_slots_come_from_the_most_novel_unselected(seed):
    n = 100
    source = InMemoryPatchSource(torch.arange(n, dtype=torch.float64)[:, None], np.zeros((n, 2)))
    selected = list(range(8))
    # novelty order: some selected patches first (skipped), then 90, 89, ...
    novel = [3, 90, 5, 89, 88, 1, 87, 86, 85, 84, 83, 82, 81, 80]
    sel = fake_selection(source, selected)
    rng = np.random.default_rng(seed)
    novel_t = torch.as_tensor(novel, dtype=torch.long)
    out = explore_selection(sel, source, fraction=0.25, generator=rng, novel=novel_t, novel_share=1.0)
    drawn = out.indices[6:].tolist()
    pool = [i for i in novel if i not in selected][: NOVEL_POOL_FACTOR * 2]
    assert out.indices[:6].tolist() == selected[:6] and len(set(drawn)) == 2 and set(drawn) <= set(pool)
    assert torch.equal(out.patches, source.read(out.indices.numpy()))
    half = explore_selection(sel, source, fraction=0.25, generator=rng, novel=novel_t, novel_share=0.5)
    drawn = half.indices[6:].tolist()
    assert len(set(drawn)) == 2 and not set(drawn) & set(selected[:6])
    assert len(set(drawn) & set(pool[:NOVEL_POOL_FACTOR])) >= 1


def test_novel_share_zero_draws_exactly_as_before():
    model, source = make_case("2d", 40, 0)
    with eval_mode(model):
        sel = select(model, source, memory_size=8, iter_size=16)
    a = explore_selection(sel, source, fraction=0.25, generator=np.random.default_rng(3))
    b = explore_selection(sel, source, fraction=0.25, generator=np.random.default_rng(3), novel_share=0.0)
    expected = np.sort(
        np.random.default_rng(3).choice(np.setdiff1d(np.arange(40), sel.indices), 2, replace=False)
    )
    assert torch.equal(a.indices, b.indices) and a.indices[6:].tolist() == expected.tolist()
    with pytest.raises(ValueError, match="NovelPool"):
        explore_selection(sel, source, fraction=0.25, generator=np.random.default_rng(3), novel_share=1.0)


def test_pool_size_and_config():
    assert novel_pool_size(8, 0.25, 1.0) == 8 + NOVEL_POOL_FACTOR * 2
    assert novel_pool_size(8, 0.25, 0.5) == 8 + NOVEL_POOL_FACTOR
    assert novel_pool_size(8, 0.0, 1.0) == 0 and novel_pool_size(8, 0.25, 0.0) == 0
    with pytest.raises(ConfigError, match="selection.explore_novel"):
        SelectionConfig(explore=0.25, explore_novel=1.5)


def test_embed_is_content_plus_position():
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="features", feature_dim=6, d_model=8, n_heads=2, d_mlp=8, pos_enc="sincos")
    model = build_model(cfg)
    x, pos = torch.randn(5, 6), torch.randint(0, 9, (5, 2)).float()
    assert model.use_pos_enc
    assert torch.allclose(model.embed(x, pos), model.add_position(model.embed_content(x), pos))
    assert not torch.allclose(model.embed(x, pos), model.embed_content(x))


def test_training_exploration_shows_the_rare_patches(tmp_path):
    """Training's selections (`explore_selections`) on the positive slides of `make_cross_slides(mark="cross", marks=3)` (three
    bright patches among 64), fresh BatchNorm model, M = 8 with two explore slots, four seeds. Measured:
    novel slots show a cross on 8/10/7/9 of 12 slides, uniform ones (top 6 included) on 5/10/1/0. The novel
    arm is the library's default `selection.explore_novel`, the uniform one its control: reverting the
    default to uniform slots fails this test."""
    from ips.config import SelectionConfig

    default = SelectionConfig().explore_novel
    assert default > 0, "the recipe draws its explore slots among the novel patches"
    shown = {default: [], 0.0: []}
    for seed in range(4):
        manifest = make_cross_slides(
            tmp_path / str(seed), n_train=24, n_val=0, seed=seed, mark="cross", marks=3
        )
        records = [r for r in read_manifest(manifest, tiny_config().model.tasks) if r.labels["label"] == 1]
        for share in shown:
            cfg = tiny_config(
                model={**TINY["model"], "encoder_norm": "batch"},
                selection={"memory_size": 8, "iter_size": 16, "explore": 0.25, "explore_novel": share},
            )
            torch.manual_seed(seed)
            model, sources = build_model(cfg.model), [make_source(r, cfg) for r in records]
            selector = Selector.from_config(cfg.selection, CPU)
            rng = np.random.default_rng([seed, 1])
            selections = explore_selections(model, sources, selector, cfg.selection, rng)
            brightest = [int(s.patches.max()) for s in selections]  # 250 only on a cross patch
            shown[share].append(sum(b == 250 for b in brightest))
    assert min(shown[default]) >= 7 and sum(shown[default]) >= 1.5 * sum(shown[0.0]), shown
