"""Precise BatchNorm statistics (ips.training.batchnorm): what the recalibration computes, and what it leaves alone."""

import torch

from ips.algo.batch import SelectedBatch
from ips.config import ModelConfig
from ips.model.ips_model import build_model
from ips.training.batchnorm import batchnorm_layers, recalibrate_batchnorm


def bn_model(norm: str = "batch", dropout: float = 0.5):
    torch.manual_seed(0)
    return build_model(
        ModelConfig(
            encoder="ips_cnn_tiny",
            encoder_norm=norm,
            in_chans=1,
            patch_size=8,
            d_model=16,
            n_heads=2,
            d_mlp=16,
            dropout=dropout,
        )
    )


def batch(seed: int, b: int = 3, m: int = 5) -> SelectedBatch:
    g = torch.Generator().manual_seed(seed)
    return SelectedBatch(
        torch.randint(0, 256, (b, m, 1, 8, 8), dtype=torch.uint8, generator=g),
        torch.rand(b, m, 2, generator=g),
        torch.ones(b, m, dtype=torch.bool),
        {},
    )


def test_statistics_are_the_average_over_the_batches():
    model = bn_model()
    model.train()
    for m in batchnorm_layers(model):  # stale statistics, as after training steps
        m.running_mean.fill_(3.0)
        m.running_var.fill_(7.0)
    params = {k: v.clone() for k, v in model.named_parameters()}
    batches = [batch(1), batch(2)]
    assert recalibrate_batchnorm(model, batches, device=torch.device("cpu")) == 2

    first = model.encoder.net[1]
    stem = model.encoder.net[0]
    expect_mean, expect_var = torch.zeros_like(first.running_mean), torch.zeros_like(first.running_var)
    with torch.no_grad():
        for b in batches:
            y = stem(model.normalize(b.patches.flatten(0, 1)))  # (n, C, H, W) before the first BatchNorm
            expect_mean += y.mean(dim=(0, 2, 3)) / 2
            expect_var += y.var(dim=(0, 2, 3), unbiased=True) / 2
    torch.testing.assert_close(first.running_mean, expect_mean)
    torch.testing.assert_close(first.running_var, expect_var)
    assert int(first.num_batches_tracked) == 2
    # parameters untouched, modes and momenta restored
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k
    assert all(m.training for m in model.modules())
    assert all(m.momentum == 0.1 for m in batchnorm_layers(model))


def test_eval_then_matches_batch_statistics_and_dropout_stays_off():
    """Recalibrated on one batch, eval-mode outputs equal the batch-statistics outputs on it (up to the
    n/(n-1) of the unbiased running variance); with dropout 0.5 on, they could not."""
    model = bn_model(dropout=0.5)
    b = batch(3)
    recalibrate_batchnorm(model, [b], device=torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        eval_out, _ = model(b.patches, b.positions, b.mask)
        for m in model.modules():
            m.train(isinstance(m, torch.nn.BatchNorm2d))
        batch_out, _ = model(b.patches, b.positions, b.mask)
    torch.testing.assert_close(
        eval_out["label"], batch_out["label"], rtol=0, atol=5e-3
    )  # stale statistics: 0.14
    assert not torch.equal(eval_out["label"], batch_out["label"])  # the n/(n-1): not a copy of one path


def test_models_without_batchnorm_are_left_alone():
    model = bn_model(norm="group")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_batchnorm(model, [batch(1)], device=torch.device("cpu")) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
