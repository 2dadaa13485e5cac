"""Cohort novelty: the distance to the nearest negative-slide embedding, against a brute-force oracle; the
bounded FIFO bank; only negative slides feed it; the streaming novel pool with it equals the global one."""

import numpy as np
import pytest
import torch
from test_selection import make_case

from ips.algo.novelty import CohortBank, CohortReference, NoveltyReference, reference_indices
from ips.algo.selection import eval_mode, global_top_m, select
from ips.data.manifest import SlideRecord
from ips.data.sources import iter_chunks
from ips.training.loop import is_negative


def oracle_scores(content: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Plain loops: per patch, the smallest mean squared standardised distance to a bank row."""
    std = bank.std(axis=0)
    scale = np.maximum(std, 0.1 * std.mean() + 1e-12)
    out = []
    for x in content:
        out.append(min(float(np.mean(((x - b) / scale) ** 2)) for b in bank))
    return np.array(out)


def test_cohort_scores_equal_the_oracle():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((37, 5)).astype(np.float32) * [1, 2, 0.01, 3, 1]
    content = rng.standard_normal((11, 5)).astype(np.float32)
    got = CohortReference.from_bank(torch.from_numpy(bank)).scores(torch.from_numpy(content)).numpy()
    np.testing.assert_allclose(got, oracle_scores(content, bank), rtol=1e-4, atol=1e-5)


def test_a_patch_like_a_negative_scores_zero_and_non_finite_never_wins():
    bank = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    ref = CohortReference.from_bank(bank)
    s = ref.scores(torch.tensor([[1.0, 1.0], [9.0, 9.0], [float("nan"), 0.0]]))
    assert s[0] == 0.0 and s[1] > 10 and s[2] == float("-inf")


def test_bank_is_a_bounded_fifo_of_finite_rows():
    bank = CohortBank(capacity=5, min_size=2)
    bank.add(torch.arange(6.0).reshape(3, 2))
    bank.add(torch.tensor([[float("inf"), 0.0], [6.0, 7.0], [8.0, 9.0], [10.0, 11.0]]))
    assert len(bank) == 5
    assert bank.bank[:, 0].tolist() == [2.0, 4.0, 6.0, 8.0, 10.0]  # the oldest dropped, the inf row never in


def test_only_negative_slides_feed_the_bank_and_it_falls_back_until_full_enough():
    bank = CohortBank(capacity=100, min_size=8)
    sample = torch.randn(6, 3)
    ref = bank.for_slide(negative=False)(sample)
    assert isinstance(ref, NoveltyReference) and len(bank) == 0  # a positive adds nothing
    ref = bank.for_slide(negative=True)(sample)
    assert isinstance(ref, NoveltyReference) and len(bank) == 6  # too few yet: the slide's own reference
    bank.for_slide(negative=True)(torch.randn(6, 3))
    ref = bank.for_slide(negative=False)(torch.randn(6, 3))
    assert isinstance(ref, CohortReference) and len(ref.bank) == 12 and len(bank) == 12


def test_bad_bank_sizes():
    with pytest.raises(ValueError, match="capacity >= min_size"):
        CohortBank(capacity=4, min_size=8)


@pytest.mark.parametrize("seed", range(3))
def test_streaming_novel_pool_against_the_cohort_equals_global_top(seed):
    rng = np.random.default_rng(300 + seed)
    n, m, i, pool = int(rng.integers(40, 100)), 4, int(rng.integers(1, 30)), int(rng.integers(1, 20))
    model, source = make_case("2d", n, seed)
    with eval_mode(model), torch.no_grad():  # eval: BatchNorm statistics stay as they are
        dim = model.embed_content(source.read(np.arange(2))).shape[1]
    bank = torch.randn(50, dim, generator=torch.Generator().manual_seed(seed))
    order = rng.permutation(n)
    cohort = CohortBank(capacity=64, min_size=8)
    cohort.add(bank)
    with eval_mode(model):
        sel = select(
            model,
            source,
            memory_size=m,
            iter_size=i,
            stream=lambda s, k: iter_chunks(s, k, order=order),
            novel_pool=pool,
            generator=np.random.default_rng(seed),
            novelty=cohort.for_slide(negative=False),
        )
        with torch.no_grad():
            scores = CohortReference.from_bank(bank).scores(model.embed_content(source.read(np.arange(n))))
    assert torch.equal(sel.novel, global_top_m(scores, pool))
    # the reference sample was still drawn (the same generator stream as slide novelty)
    assert len(reference_indices(n, np.random.default_rng(seed))) == min(32, n)


def test_negative_means_every_label_zero_or_empty():
    assert is_negative(SlideRecord("a", "p", labels={"x": 0, "y": ()}))
    assert not is_negative(SlideRecord("b", "p", labels={"x": 0, "y": (2,)}))
    assert not is_negative(SlideRecord("c", "p", labels={"x": 1}))
