"""Inference is exact: the attention over all N and the whole-bag aggregation gathered during the
selection pass equal the all-at-once computation for any chunk size and order; the top-M prediction
equals a brute-force oracle (embed every patch, rank by the logit score computed by hand, run the
model on the global top M)."""

import numpy as np
import pytest
import torch
from inference_fixtures import BINARY, MULTICLASS, MULTILABEL, tiny_cfg

from ips.data.sources import InMemoryPatchSource, iter_chunks
from ips.infer.engine import Predictor, Selector, infer_slide
from ips.infer.slide import OnlineSoftmaxPool, global_logsumexp
from ips.model.ips_model import build_model

CASES = [  # (spatial_dims, in_chans, patch, tasks, n_heads)
    (2, 3, 8, [BINARY], 4),
    (2, 1, 8, [BINARY, MULTICLASS, MULTILABEL], 2),
    (3, 1, 8, [MULTICLASS], 4),
]
IDS = ["2d", "2d-3tasks", "3d"]


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


def _brute_force_top_m(model, source, m):
    """Oracle: every patch embedded at once, the logit score by hand (mean over tasks and heads of
    `<q, k> / sqrt(d_k)`), the global top-m by a stable sort (ties: lower index), then the model on those
    m patches in that order. -> (indices (m,), {task: (n_out,)})."""
    with torch.no_grad():
        emb = model.embed(source.patches, torch.from_numpy(source.positions()))  # (N, D)
        agg = model.aggregator
        q = agg.q_proj(agg.queries).unflatten(-1, (agg.n_heads, -1))  # (T, H, d_k)
        k = agg.k_proj(agg.norm_kv(emb)).unflatten(-1, (agg.n_heads, -1))  # (N, H, d_k)
        logits = torch.einsum("thd,nhd->thn", q, k) / k.shape[-1] ** 0.5  # (T, H, N)
        score = logits.mean(dim=(0, 1)).numpy()  # (N,)
        order = np.lexsort((np.arange(len(score)), -score))[:m]
        idx = torch.from_numpy(order)
        out, _ = model(source.patches[idx][None], torch.from_numpy(source.positions()[order])[None])
    return order, {k: v[0] for k, v in out.items()}


def _brute_force_softmax_mean(model, source, m, i):
    """Oracle of the reference implementation's iterative selection with the softmax-mean score, written
    out plainly: keep a buffer of m, add each chunk of i in index order, keep the m best by the mean
    over tasks and heads of the softmax over buffer + chunk (ties: lower index)."""
    with torch.no_grad():
        emb = model.embed(source.patches, torch.from_numpy(source.positions()))  # (N, D)
        buffer = np.empty(0, dtype=np.int64)
        for start in range(0, len(source), i):
            cand = np.concatenate([buffer, np.arange(start, min(start + i, len(source)))])
            score = model.aggregator.attention_logits(emb[cand][None])[0].softmax(-1).mean(dim=(0, 1)).numpy()
            buffer = cand[np.lexsort((cand, -score))[:m]]
    return buffer


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 100])
def test_whole_bag_streaming_equals_all_at_once(case, chunk):
    model, source = _model_and_source(*case)
    ref_logits, ref_attn = _all_at_once(model, source)
    inf = infer_slide(model, source, memory_size=4, iter_size=chunk, modes=("all",))
    assert inf.head_logits.shape == (len(source), ref_attn.shape[0], ref_attn.shape[1])
    np.testing.assert_allclose(inf.head_logits, ref_attn.permute(2, 0, 1).numpy(), rtol=1e-5, atol=1e-5)
    for name, ref in ref_logits.items():
        torch.testing.assert_close(inf.logits["all"][name], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
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
    a = Predictor(model, Selector(4, 6)).infer(source, modes=("topm", "all"))
    perm = np.random.default_rng(0).permutation(len(source))
    shuffled = Selector(4, 6, stream=lambda s, c: iter_chunks(s, c, order=perm))
    b = Predictor(model, shuffled).infer(source, modes=("topm", "all"))
    np.testing.assert_allclose(a.head_logits, b.head_logits, rtol=1e-6, atol=1e-6)  # by patch, not arrival
    assert a.selected.tolist() == b.selected.tolist()
    for mode in ("topm", "all"):
        for k in a.logits[mode]:
            torch.testing.assert_close(a.logits[mode][k], b.logits[mode][k], rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize(("n", "m", "i"), [(50, 6, 8), (50, 6, 1), (40, 9, 40), (5, 8, 3)])
def test_topm_prediction_equals_the_brute_force_oracle(case, n, m, i):
    """`predict` and `infer` pick the global top-M of the hand-computed score and predict from exactly
    those patches (n <= M: every patch)."""
    model, source = _model_and_source(*case, n=n)
    want_idx, want = _brute_force_top_m(model, source, m)
    predictor = Predictor(model, Selector(m, i))
    inf = predictor.infer(source, modes=("topm",))
    assert inf.selected.tolist() == want_idx.tolist()
    for name, value in want.items():
        torch.testing.assert_close(inf.logits["topm"][name], value, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(predictor.predict(source)[name], value, rtol=1e-5, atol=1e-5)


def test_softmax_mean_score_runs_the_reference_selection():
    model, source = _model_and_source(*CASES[0], n=30)
    inf = infer_slide(model, source, memory_size=5, iter_size=4, score="softmax_mean", modes=("topm",))
    want = _brute_force_softmax_mean(model, source, 5, 4)
    assert inf.selected.tolist() == want.tolist()


def test_model_mode_is_restored_and_bad_arguments_fail():
    model, source = _model_and_source(*CASES[0], n=10)
    model.train()
    predictor = Predictor(model, Selector(4, 3))
    predictor.infer(source)
    predictor.predict(source)
    assert model.training and all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="unknown inference mode 'every'"):
        predictor.infer(source, modes=("every",))
    empty = InMemoryPatchSource(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="empty bag"):
        predictor.infer(empty)
