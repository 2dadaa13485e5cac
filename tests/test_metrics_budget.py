import math

import numpy as np
import pytest
import torch

from ips.config import ModelConfig, TaskConfig
from ips.model.aggregator import sincos_encoding
from ips.model.ips_model import build_model
from ips.model.metrics import auroc, balanced_accuracy, evaluate_logits
from ips.training.budget import GB, BudgetError, estimate_step_bytes, plan_micro_batch
from ips.training.loop import epoch_order
from ips.training.schedule import warmup_cosine


def brute_auroc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    wins = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    return float(np.mean(wins))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pair_counting(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, 40).astype(float)  # many ties
    positive = rng.random(40) < 0.4
    assert auroc(scores, positive) == pytest.approx(brute_auroc(scores, positive))


def test_auroc_degenerate():
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([True, True])))
    assert auroc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0


def test_balanced_accuracy():
    y = np.array([0, 0, 0, 0, 1])
    assert balanced_accuracy(np.zeros(5, dtype=int), y, 2) == 0.5


def test_evaluate_logits_all_kinds():
    tasks = (
        TaskConfig(name="b", kind="binary"),
        TaskConfig(name="m", kind="multiclass", num_classes=3),
        TaskConfig(name="l", kind="multilabel", num_classes=2),
    )
    logits = {
        "b": torch.tensor([[2.0], [-1.0], [0.5]]),
        "m": torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]]),
        "l": torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]),
    }
    targets = {
        "b": torch.tensor([1, 0, 0]),
        "m": torch.tensor([0, 1, 2]),
        "l": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
    }
    out = evaluate_logits(tasks, logits, targets)
    assert out["b/accuracy"] == pytest.approx(2 / 3) and out["b/auroc"] == 1.0
    assert out["m/accuracy"] == 1.0 and out["m/balanced_accuracy"] == 1.0 and out["m/auroc"] == 1.0
    assert out["l/accuracy"] == pytest.approx(5 / 6) and out["l/exact_match"] == pytest.approx(2 / 3)
    assert math.isfinite(out["loss"])


def test_planner_picks_largest_fitting_micro_batch():
    cost = lambda k: int((1.0 + 0.5 * k) * GB)  # noqa: E731 - fixed 1 GB + 0.5 GB per slide
    plan = plan_micro_batch(cost, budget_bytes=int(3.2 * GB), batch_size=16, measured=True, hint="x")
    assert plan.micro_batch_size == 4 and plan.bytes_per_micro_batch <= 3.2 * GB
    assert (
        plan_micro_batch(cost, budget_bytes=100 * GB, batch_size=16, measured=True, hint="x").micro_batch_size
        == 16
    )


def test_planner_steps_down_when_affine_model_is_optimistic():
    cost = lambda k: int((1.0 + 0.5 * k + (0.6 if k >= 4 else 0)) * GB)  # noqa: E731
    plan = plan_micro_batch(cost, budget_bytes=int(3.2 * GB), batch_size=16, measured=True, hint="x")
    assert plan.micro_batch_size == 3


def test_planner_refuses_impossible_budget_naming_what_to_lower():
    with pytest.raises(
        BudgetError, match=r"one slide needs 6.00 GB.*budget_gb is 5.00 GB.*lower selection.memory_size"
    ):
        plan_micro_batch(
            lambda k: 6 * GB * k,
            budget_bytes=5 * GB,
            batch_size=4,
            measured=True,
            hint="selection.memory_size (M=100)",
        )


def test_cpu_estimate_grows_with_micro_batch():
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="ips_cnn_tiny", patch_size=16, d_model=16, n_heads=2, d_mlp=16))

    def step(k):
        logits, _ = model(torch.randint(0, 255, (k, 4, 3, 16, 16), dtype=torch.uint8), torch.rand(k, 4, 2))
        return logits["label"].sum()

    one, four = estimate_step_bytes(model, lambda: step(1)), estimate_step_bytes(model, lambda: step(4))
    params = sum(p.numel() * 4 for p in model.parameters())
    assert 4 * params < one < four and (four - 4 * params) == pytest.approx(4 * (one - 4 * params), rel=0.2)


def test_warmup_cosine():
    f = [warmup_cosine(s, warmup_steps=4, total_steps=20) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0 and f[-1] < 0.05
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_epoch_order_deterministic_and_padded():
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1) != epoch_order(10, 0, 2)
    padded = epoch_order(7, 0, 1, world_size=2)
    assert len(padded) == 8 and sorted(set(padded)) == list(range(7))


def test_sincos_encoding_distinguishes_positions():
    pos = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    enc = sincos_encoding(pos, 16)
    assert enc.shape == (3, 16) and not torch.allclose(enc[1], enc[2])
    enc3 = sincos_encoding(torch.rand(5, 3), 128)  # 128 is not divisible by 6: zero padding
    assert enc3.shape == (5, 128) and torch.all(enc3[:, 126:] == 0)
