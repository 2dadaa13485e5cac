"""Exactness of streaming selection: iterative top-M == global top-M; memory O(M + I)."""

import gc

import numpy as np
import pytest
import torch

from ips.algo.selection import eval_mode, global_top_m, select
from ips.config import ModelConfig, TaskConfig
from ips.data.sources import InMemoryPatchSource, iter_chunks
from ips.model.ips_model import build_model
from ips.training.explore import explore_selection

TASKS = (TaskConfig(name="a", kind="binary"), TaskConfig(name="b", kind="multiclass", num_classes=3))


def make_case(kind: str, n: int, seed: int):
    """A float64 model and a bag of n patches (float64: scores independent of batch composition)."""
    torch.manual_seed(seed)
    if kind == "features":
        cfg = ModelConfig(encoder="features", feature_dim=12, d_model=24, n_heads=3, d_mlp=16, tasks=TASKS)
        patches, dims = torch.randn(n, 12, dtype=torch.float64), 2
    else:
        dims = 2 if kind == "2d" else 3
        size = 8 if dims == 2 else 4
        cfg = ModelConfig(
            encoder="ips_cnn_tiny",
            spatial_dims=dims,
            in_chans=2,
            patch_size=size,
            d_model=24,
            n_heads=3,
            d_mlp=16,
            tasks=TASKS,
        )
        patches = torch.randint(0, 256, (n, 2, *([size] * dims)), dtype=torch.uint8)
    model = build_model(cfg).double()
    positions = np.random.default_rng(seed).integers(0, 50, size=(n, dims))
    return model, InMemoryPatchSource(patches, positions, record_reads=True)


def global_scores(model, source) -> torch.Tensor:
    idx = np.arange(len(source))
    with eval_mode(model), torch.no_grad():
        emb = model.embed(source.read(idx), torch.from_numpy(source.positions()).double())
        return model.selection_scores(emb[None])[0]


def shuffled_stream(order):
    def stream(source, chunk_size):
        return iter_chunks(source, chunk_size, order=order)

    return stream


@pytest.mark.parametrize("kind", ["2d", "3d", "features"])
@pytest.mark.parametrize("seed", range(4))
def test_iterative_equals_global_top_m(kind, seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(20, 90))
    m, i = int(rng.integers(1, n)), int(rng.integers(1, 40))
    model, source = make_case(kind, n, seed)
    expected = global_top_m(global_scores(model, source), m)
    order = rng.permutation(n)
    with eval_mode(model):
        sel = select(model, source, memory_size=m, iter_size=i, stream=shuffled_stream(order))
    assert torch.equal(sel.indices, expected), (n, m, i)
    # the selection carries the patches and positions of the selected indices
    assert torch.equal(sel.patches, source.read(sel.indices.numpy()))
    np.testing.assert_array_equal(sel.positions.numpy(), source.positions()[sel.indices.numpy()])
    assert torch.all(sel.scores[:-1] >= sel.scores[1:])  # best first


def test_each_patch_read_exactly_once():
    model, source = make_case("2d", 50, 0)
    with eval_mode(model):
        select(model, source, memory_size=7, iter_size=9)
    reads = np.concatenate(source.reads)
    assert sorted(reads.tolist()) == list(range(50))
    assert max(len(r) for r in source.reads) <= 9


def test_ties_broken_by_lower_index():
    torch.manual_seed(0)
    model, _ = make_case("features", 4, 0)
    # 30 patches, only 3 distinct (all positions equal): many exact ties
    base = torch.randn(3, 12, dtype=torch.float64)
    patches = base[torch.arange(30) % 3]
    source = InMemoryPatchSource(patches, np.zeros((30, 2)))
    rng = np.random.default_rng(0)
    with eval_mode(model):
        sels = [
            select(model, source, memory_size=m, iter_size=4, stream=shuffled_stream(rng.permutation(30)))
            for m in (5, 5, 11)
        ]
    best = int(torch.argmax(global_scores(model, source)[:3]))
    assert sels[0].indices.tolist() == [best + 3 * k for k in range(5)]
    assert torch.equal(sels[0].indices, sels[1].indices)
    assert sels[2].indices[:10].tolist() == [best + 3 * k for k in range(10)]


def test_n_at_most_m_takes_all_without_scoring():
    model, source = make_case("2d", 6, 0)
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    with eval_mode(model):
        sel = select(model, source, memory_size=6, iter_size=2)
    assert sel.indices.tolist() == list(range(6)) and not calls and torch.isnan(sel.scores).all()


def test_softmax_mean_score_single_head_equals_global():
    # with one head and one task the softmax is monotone in the logit, so the reference score is exact too
    torch.manual_seed(3)
    cfg = ModelConfig(encoder="features", feature_dim=6, d_model=8, n_heads=1, d_mlp=8)
    model = build_model(cfg).double()
    source = InMemoryPatchSource(torch.randn(60, 6, dtype=torch.float64), np.zeros((60, 2)))
    with eval_mode(model):
        sel = select(model, source, memory_size=10, iter_size=7, score="softmax_mean")
    assert set(sel.indices.tolist()) == set(global_top_m(global_scores(model, source), 10).tolist())


def test_eval_mode_restores_each_submodule():
    model, _ = make_case("2d", 4, 0)
    model.train()
    model.encoder.eval()  # a mixed state, e.g. a frozen encoder
    before = {name: m.training for name, m in model.named_modules()}
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert {name: m.training for name, m in model.named_modules()} == before


def _live(shape_tail: tuple[int, ...], exclude: set[int]) -> int:
    """Items of shape `shape_tail` held by live tensors, counting each storage once."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.ndim >= 1 and tuple(obj.shape[1:]) == shape_tail:
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in seen or ptr in exclude or storage.nbytes() == 0:
                continue
            seen.add(ptr)
            total += storage.nbytes() // (obj.element_size() * int(np.prod(shape_tail)))
    return total


@pytest.mark.slow
@pytest.mark.parametrize("score", ["logit", "softmax_mean"])
def test_selection_holds_at_most_m_plus_i(score):
    """Count, at every read, the patches and embeddings alive anywhere in the process."""
    m, i, n = 6, 5, 80
    model, source = make_case("2d", n, 1)
    d = model.d_model
    peaks = {"patches": 0, "embeddings": 0}
    original_read = source.read
    exclude = {source.patches.untyped_storage().data_ptr()}
    exclude |= {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def tracked_read(idx):
        out = original_read(idx)
        gc.collect()
        peaks["patches"] = max(peaks["patches"], _live(source.patch_shape, exclude))
        peaks["embeddings"] = max(peaks["embeddings"], _live((d,), exclude))
        return out

    source.read = tracked_read
    with eval_mode(model):
        select(model, source, memory_size=m, iter_size=i, score=score)
    assert 0 < peaks["patches"] <= m + i, peaks
    assert peaks["embeddings"] <= m + i, peaks


def test_bad_arguments():
    model, source = make_case("2d", 10, 0)
    with pytest.raises(ValueError, match="memory_size"):
        select(model, source, memory_size=0, iter_size=2)
    with pytest.raises(ValueError, match="score"):
        select(model, source, memory_size=2, iter_size=2, score="max")
    empty = InMemoryPatchSource(torch.zeros(0, 2, 8, 8, dtype=torch.uint8), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="empty bag"):
        select(model, empty, memory_size=2, iter_size=2)


def test_explore_selection_swaps_the_lowest_for_unselected_patches():
    model, source = make_case("2d", 40, 0)
    with eval_mode(model):
        sel = select(model, source, memory_size=8, iter_size=16)
    out = explore_selection(sel, source, fraction=0.25, generator=np.random.default_rng(0))
    assert torch.equal(out.indices[:6], sel.indices[:6])  # the best 6 stay
    drawn = out.indices[6:]
    assert len(set(drawn.tolist())) == 2 and not set(drawn.tolist()) & set(sel.indices.tolist())
    assert torch.equal(out.patches, source.read(out.indices.numpy()))
    np.testing.assert_array_equal(out.positions.numpy(), source.positions()[out.indices.numpy()])
    assert torch.isnan(out.scores[6:]).all()
    assert explore_selection(sel, source, fraction=0.0, generator=np.random.default_rng(0)) is sel
