"""The shift block of the encoder zoo: a zero-MAC spatial shift before 1^d convolutions."""

import pytest
import torch

from ips.bench.encoders import count_macs
from ips.model.encoders import ShiftBlock, build_encoder, spatial_shift


@pytest.mark.parametrize("dims", [2, 3])
def test_shift_moves_each_group_one_step_along_its_axis(dims):
    groups = 2 * dims + 1
    size = 5
    x = torch.zeros(1, groups, *([size] * dims))
    centre = (2,) * dims
    x[(0, slice(None), *centre)] = torch.arange(1, groups + 1, dtype=torch.float)
    y = spatial_shift(x, dims)
    for g in range(groups):
        where = list(centre)
        if g < groups - 1:
            where[g // 2] += 1 if g % 2 == 0 else -1
        want = torch.zeros(*([size] * dims))
        want[tuple(where)] = g + 1
        assert torch.equal(y[0, g], want), g


def test_shift_drops_what_leaves_the_patch_and_fills_zeros():
    x = torch.ones(1, 5, 3, 3)
    y = spatial_shift(x, 2)
    assert y[0, 0, 0].sum() == 0 and y[0, 0, 1:].sum() == 6  # forward along rows: first row empty
    assert y[0, 1, -1].sum() == 0  # backward along rows: last row empty
    assert y[0, 2, :, 0].sum() == 0 and y[0, 3, :, -1].sum() == 0
    assert torch.equal(y[0, 4], x[0, 4])


@pytest.mark.parametrize("dims", [2, 3])
def test_shift_block_costs_only_its_pointwise_convolutions(dims):
    block = ShiftBlock(16, 32, 2, dims, "group").eval()
    x = torch.randn(2, 16, *([8] * dims))
    out = block(x)
    assert out.shape == (2, 32, *([4] * dims))
    kernel_sizes = {
        m.kernel_size for m in block.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))
    }
    assert kernel_sizes == {(1,) * dims}
    # MACs: three 1^d convs on the 4^d output grid (conv1, conv2, skip), nothing for the shifts
    want = (16 * 32 + 32 * 32 + 16 * 32) * 4**dims
    assert count_macs(block, x[:1]) == want


@pytest.mark.parametrize("dims,patch", [(2, 32), (3, 32)])
def test_shift_encoder_shapes_and_gradients(dims, patch):
    enc = build_encoder("ips_shift10", in_chans=1, spatial_dims=dims, patch_size=patch)
    x = torch.randn(2, 1, *([patch] * dims))
    out = enc(x)
    assert out.shape == (2, enc.out_dim) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
