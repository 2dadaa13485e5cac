import pytest
import torch

from ips.algo.batch import stack_selections
from ips.algo.selection import Selection
from ips.config import ModelConfig, TaskConfig
from ips.model.ips_model import build_model
from ips.model.tasks import label_tensor
from ips.training.step import accumulate_gradients

TASKS = (
    TaskConfig(name="bin", kind="binary"),
    TaskConfig(name="cls", kind="multiclass", num_classes=3, weight=0.5),
    TaskConfig(name="ml", kind="multilabel", num_classes=4),
)


def make_batch(b=5, m=4, seed=0, dims=2, short_bag=True):
    g = torch.Generator().manual_seed(seed)
    sels = []
    for i in range(b):
        k = 2 if (short_bag and i == 1) else m  # one bag with fewer than M patches (padded)
        sels.append(
            Selection(
                torch.arange(k),
                torch.zeros(k),
                torch.randint(0, 256, (k, 3, *([8] * dims)), generator=g, dtype=torch.uint8),
                torch.rand(k, dims, generator=g) * 20,
            )
        )
    targets = {
        "bin": label_tensor(TASKS[0], [i % 2 for i in range(b)]),
        "cls": label_tensor(TASKS[1], [i % 3 for i in range(b)]),
        "ml": label_tensor(TASKS[2], [tuple(range(i % 4)) for i in range(b)]),
    }
    return stack_selections(sels, targets, m)


def grads_for(micro: int, dims: int = 2):
    torch.manual_seed(0)
    cfg = ModelConfig(
        encoder="ips_cnn_tiny",
        encoder_norm="group",  # each patch on its own: micro-batching is exact (BatchNorm is not)
        spatial_dims=dims,
        patch_size=8,
        d_model=24,
        n_heads=2,
        d_mlp=16,
        tasks=TASKS,
    )
    model = build_model(cfg).double()
    batch = make_batch(dims=dims)
    batch.positions = batch.positions.double()
    loss, logits = accumulate_gradients(model, batch, TASKS, micro_batch_size=micro)
    return loss, logits, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dims", [2, 3])
def test_micro_batched_gradients_equal_full_batch(dims):
    loss_full, logits_full, g_full = grads_for(5, dims)
    for micro in (1, 2, 3):
        loss, logits, g = grads_for(micro, dims)
        assert loss == pytest.approx(loss_full, rel=1e-10)
        for k in logits_full:
            torch.testing.assert_close(logits[k], logits_full[k])
        for name in g_full:
            torch.testing.assert_close(g[name], g_full[name], rtol=1e-9, atol=1e-12, msg=name)
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in g_full.values())


def test_stack_pads_and_masks():
    batch = make_batch(b=3, m=4)
    assert batch.patches.shape == (3, 4, 3, 8, 8) and batch.mask.tolist()[1] == [True, True, False, False]
    assert batch.mask[0].all() and batch.mask[2].all()


def test_label_tensor_multilabel():
    t = label_tensor(TASKS[2], [(0, 3), (), (1,)])
    assert t.tolist() == [[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]]


def test_non_finite_loss_is_an_error():
    cfg = ModelConfig(encoder="ips_cnn_tiny", patch_size=8, d_model=24, n_heads=2, d_mlp=16, tasks=TASKS)
    model = build_model(cfg)
    batch = make_batch()
    with torch.no_grad():
        next(model.heads.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        accumulate_gradients(model, batch, TASKS, micro_batch_size=2)


def test_bad_micro_batch():
    cfg = ModelConfig(encoder="ips_cnn_tiny", patch_size=8, d_model=24, n_heads=2, d_mlp=16, tasks=TASKS)
    with pytest.raises(ValueError, match="micro_batch_size"):
        accumulate_gradients(build_model(cfg), make_batch(), TASKS, micro_batch_size=0)
