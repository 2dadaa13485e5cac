"""Streaming inference is exact: attention over all N and whole-bag aggregation equal the all-at-once
computation for any chunk size and order; the top-M prediction equals the trained path's."""

import numpy as np
import pytest
import torch
from inference_fixtures import BINARY, MULTICLASS, MULTILABEL, tiny_cfg

from ips.algo.selection import eval_mode, select
from ips.data.sources import InMemoryPatchSource, iter_chunks
from ips.infer.slide import OnlineSoftmaxPool, global_logsumexp, infer_slide, stream_slide
from ips.model.ips_model import build_model

CASES = [  # (spatial_dims, in_chans, patch, tasks, n_heads)
    (2, 3, 8, [BINARY], 4),
    (2, 1, 8, [BINARY, MULTICLASS, MULTILABEL], 2),
    (3, 1, 8, [MULTICLASS], 4),
]


def _model_and_source(dims, chans, patch, tasks, heads, n=37, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_cfg(in_chans=chans, patch=patch, dims=dims, tasks=tasks, n_heads=heads)
    model = build_model(cfg.model).eval()
    patches = torch.randint(0, 256, (n, chans, *[patch] * dims), dtype=torch.uint8)
    side = int(np.ceil(n ** (1 / dims)))
    positions = np.stack(np.unravel_index(np.arange(n), (side,) * dims), axis=1)
    return model, InMemoryPatchSource(patches, positions)


def _all_at_once(model, source):
    """Reference: embed all N, aggregator on the whole bag. -> (logits dict, attn logits (T, H, N))."""
    with torch.no_grad():
        emb = model.embed(source.patches, torch.from_numpy(source.positions()))  # (N, D)
        z, attn = model.aggregator(emb[None])
        return {k: v[0] for k, v in model.heads(z).items()}, attn[0]


@pytest.mark.parametrize("case", CASES, ids=["2d", "2d-3tasks", "3d"])
@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 100])
def test_whole_bag_streaming_equals_all_at_once(case, chunk):
    model, source = _model_and_source(*case)
    ref_logits, ref_attn = _all_at_once(model, source)
    head_logits, logits = stream_slide(model, source, chunk_size=chunk, aggregate=True)
    assert head_logits.shape == (len(source), ref_attn.shape[0], ref_attn.shape[1])
    np.testing.assert_allclose(head_logits, ref_attn.permute(2, 0, 1).numpy(), rtol=1e-5, atol=1e-5)
    for name, ref in ref_logits.items():
        torch.testing.assert_close(logits[name], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=["2d", "2d-3tasks", "3d"])
def test_streamed_attention_is_softmax_over_all_n(case):
    model, source = _model_and_source(*case)
    _, ref_attn = _all_at_once(model, source)  # (T, H, N)
    inf = infer_slide(model, source, memory_size=4, iter_size=7, modes=("topm",))
    expected = ref_attn.softmax(dim=-1).mean(dim=1).T.numpy()  # (N, T)
    np.testing.assert_allclose(inf.attention, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(inf.attention.sum(axis=0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(inf.mean_logit, ref_attn.mean(dim=1).T.numpy(), rtol=1e-5, atol=1e-5)


def test_any_streaming_order_gives_the_same_result():
    model, source = _model_and_source(*CASES[1])
    a, la = stream_slide(model, source, chunk_size=6, aggregate=True)
    perm = np.random.default_rng(0).permutation(len(source))
    b, lb = stream_slide(
        model, source, chunk_size=6, aggregate=True, stream=lambda s, c: iter_chunks(s, c, order=perm)
    )
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # indexed by patch, not by arrival
    for k in la:
        torch.testing.assert_close(la[k], lb[k], rtol=1e-5, atol=1e-6)


def test_online_softmax_is_stable_for_extreme_logits():
    """Logits far apart (1e4) overflow a naive exp-sum; the running max keeps it exact."""
    logits = torch.tensor([[[1e4, -1e4, 1e4 - 1.0, 3.0]]], dtype=torch.float64)  # (T=1, H=1, n=4)
    values = torch.arange(8, dtype=torch.float64).reshape(1, 4, 2)  # (H, n, d_k)
    pool = OnlineSoftmaxPool()
    for i in range(4):  # one patch at a time, the largest first and last
        pool.update(logits[..., i : i + 1], values[:, i : i + 1])
    ref = torch.einsum("thn,hnd->thd", logits.softmax(-1), values)
    torch.testing.assert_close(pool.pooled(), ref)
    lse = global_logsumexp(logits.permute(2, 0, 1).numpy())
    np.testing.assert_allclose(lse, torch.logsumexp(logits, -1).numpy())


def test_topm_prediction_equals_selection_then_forward():
    """The default mode reuses the pass: its top-M is select()'s, its prediction the trained forward's."""
    model, source = _model_and_source(*CASES[1], n=50)
    inf = infer_slide(model, source, memory_size=6, iter_size=8, modes=("topm", "all"))
    with eval_mode(model), torch.no_grad():
        sel = select(model, source, memory_size=6, iter_size=8)
        ref, _ = model(sel.patches[None], sel.positions[None])
    assert inf.selected.tolist() == sel.indices.tolist()
    for name, value in ref.items():
        torch.testing.assert_close(inf.logits["topm"][name], value[0], rtol=1e-5, atol=1e-5)
    assert set(inf.logits) == {"topm", "all"}


def test_softmax_mean_score_runs_the_trained_selection():
    model, source = _model_and_source(*CASES[0], n=30)
    inf = infer_slide(model, source, memory_size=5, iter_size=4, score="softmax_mean", modes=("topm",))
    with eval_mode(model):
        sel = select(model, source, memory_size=5, iter_size=4, score="softmax_mean")
    assert inf.selected.tolist() == sel.indices.tolist()


def test_model_mode_is_restored_and_bad_arguments_fail():
    model, source = _model_and_source(*CASES[0], n=10)
    model.train()
    infer_slide(model, source, memory_size=4, iter_size=3)
    assert model.training
    with pytest.raises(ValueError, match="unknown inference mode 'every'"):
        infer_slide(model, source, memory_size=4, iter_size=3, modes=("every",))
    empty = InMemoryPatchSource(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="empty bag"):
        stream_slide(model, empty, chunk_size=4)
