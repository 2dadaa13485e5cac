"""Patch augmentation: exact group actions for flips/rotations, small colour changes, determinism."""

from __future__ import annotations

import itertools

import pytest
import torch

from ips.config import ConfigError, DataConfig, ExperimentConfig
from ips.data.augment import PatchAugment, color_jitter, flip_rotate, hed_jitter, shift_patches


def _patches(shape, seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _dihedral_2d(p: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/rotations of one patch `(C, H, W)`."""
    out = []
    for k in range(4):
        r = torch.rot90(p, k, dims=(1, 2))
        out += [r, r.flip(2)]
    return out


def _is_one_of(x: torch.Tensor, candidates: list[torch.Tensor]) -> bool:
    return any(torch.equal(x, c) for c in candidates)


def test_2d_square_each_patch_is_a_dihedral_image():
    x = _patches((64, 3, 5, 5))
    y = flip_rotate(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    assert all(_is_one_of(y[i], _dihedral_2d(x[i])) for i in range(len(x)))
    # every one of the 8 transforms occurs over 64 patches (random per patch, not per batch)
    used = {next(k for k, c in enumerate(_dihedral_2d(x[i])) if torch.equal(y[i], c)) for i in range(len(x))}
    assert len(used) >= 6


def test_2d_non_square_only_flips():
    x = _patches((16, 1, 4, 6))
    y = flip_rotate(x, torch.Generator().manual_seed(2))
    assert y.shape == x.shape
    for i in range(16):
        assert _is_one_of(y[i], [x[i], x[i].flip(1), x[i].flip(2), x[i].flip(1).flip(2)])


def test_3d_rotations_only_in_square_planes():
    # D=3, H=W=4: rotations only in the (H, W) plane, so the depth axis stays the depth axis
    x = _patches((20, 2, 3, 4, 4))
    y = flip_rotate(x, torch.Generator().manual_seed(3))
    assert y.shape == x.shape
    for i in range(20):
        cands = []
        for fd in (False, True):
            base = x[i].flip(1) if fd else x[i]
            for k in range(4):
                r = torch.rot90(base, k, dims=(2, 3))
                cands += [r, r.flip(2), r.flip(3), r.flip(2).flip(3)]
        assert _is_one_of(y[i], cands)


def test_3d_cubic_keeps_values_and_shape():
    x = _patches((10, 1, 4, 4, 4))
    y = flip_rotate(x, torch.Generator().manual_seed(4))
    assert y.shape == x.shape
    for i in range(10):  # a permutation of the voxels
        assert torch.equal(y[i].flatten().sort().values, x[i].flatten().sort().values)
    assert not torch.equal(x, y)


def test_input_not_modified():
    x = _patches((8, 3, 4, 4))
    before = x.clone()
    PatchAugment(color_jitter=0.1)(x, torch.Generator().manual_seed(0))
    flip_rotate(x, torch.Generator().manual_seed(0), flips=False)
    assert torch.equal(x, before)


def test_deterministic_with_generator():
    x = _patches((8, 3, 6, 6))
    aug = PatchAugment(color_jitter=0.05)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_identity_when_disabled():
    x = _patches((4, 3, 6, 6))
    assert PatchAugment(enabled=False, color_jitter=0.3)(x) is x
    assert PatchAugment(flips=False, rot90=False, color_jitter=0.0)(x) is x
    assert PatchAugment.from_config(DataConfig(augment=False))(x) is x
    assert PatchAugment.from_config(DataConfig(augment=True, color_jitter=0.05)).color_jitter == 0.05


def _reflect_index(i: int, side: int) -> int:
    """Where 'reflect' padding reads index i (may be outside [0, side)) from: edge pixel not repeated."""
    if i < 0:
        return -i
    if i >= side:
        return 2 * (side - 1) - i
    return i


def _shifted(p: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
    """Patch `(C, *S)` moved by `offsets`: output[q] = p[reflect(q - o)] per axis (written out, no pad)."""
    out = p
    for axis, o in enumerate(offsets, start=1):
        side = p.shape[axis]
        idx = torch.tensor([_reflect_index(q - o, side) for q in range(side)])
        out = out.index_select(axis, idx)
    return out


@pytest.mark.parametrize("shape", [(40, 2, 7, 6), (30, 1, 5, 6, 4)])
def test_shift_each_patch_is_a_reflected_translation(shape):
    x = _patches(shape)
    s = 2
    y = shift_patches(x, s, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    all_offsets = list(itertools.product(range(-s, s + 1), repeat=len(shape) - 2))
    seen = set()
    for a, b in zip(x, y):
        match = [o for o in all_offsets if torch.equal(b, _shifted(a, o))]
        assert len(match) == 1, "every output patch is exactly one translation of its input"
        seen.add(match[0])
    # every offset per axis, both signs, is drawn
    for axis in range(len(shape) - 2):
        assert {o[axis] for o in seen} == set(range(-s, s + 1))


def test_shift_config_and_errors():
    x = _patches((6, 1, 8, 8))
    assert shift_patches(x, 0) is x
    aug = PatchAugment.from_config(DataConfig(orientation=False, color_jitter=0.0, shift=3))
    assert (aug.flips, aug.rot90, aug.shift) == (False, False, 3)
    a, b = aug(x, torch.Generator().manual_seed(4)), aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, x)
    with pytest.raises(ValueError, match="data.shift: 8 pixels must be smaller than the patch side 8"):
        shift_patches(x, 8)
    with pytest.raises(ConfigError, match="data.shift"):
        DataConfig(shift=-1)
    # caught when the config is read, before any training: the patch side is in the same config
    with pytest.raises(ConfigError, match="data.shift: 16 pixels must be smaller than model.patch_size 16"):
        ExperimentConfig.from_dict({"model": {"patch_size": 16}, "data": {"shift": 16}})
    assert ExperimentConfig.from_dict({"model": {"patch_size": 16}, "data": {"shift": 15}}).data.shift == 15


def test_hed_jitter_small_and_in_range():
    x = _patches((16, 3, 8, 8)) * 0.8 + 0.1
    y = hed_jitter(x, 0.05, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert y.min() >= 0 and y.max() <= 1
    assert 0 < (y - x).abs().mean() < 0.1
    # strength 0 is the identity up to the round trip through optical density
    torch.testing.assert_close(hed_jitter(x, 0.0), x, atol=1e-4, rtol=0)


def test_color_jitter_small_any_channels():
    for c in (1, 3, 4):
        x = _patches((8, c, 6, 6))
        y = color_jitter(x, 0.05, torch.Generator().manual_seed(1))
        assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
        assert float((y - x).abs().mean()) < 0.1


def test_half_precision_and_empty():
    x = _patches((4, 3, 8, 8)).to(torch.bfloat16)
    y = PatchAugment(color_jitter=0.05)(x, torch.Generator().manual_seed(0))
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    empty = torch.zeros(0, 3, 8, 8)
    assert PatchAugment(color_jitter=0.1)(empty).shape == (0, 3, 8, 8)


def test_bad_inputs():
    with pytest.raises(TypeError, match="float"):
        PatchAugment()(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        PatchAugment()(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="color_jitter"):
        PatchAugment(color_jitter=0.9)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_cpu_generator():
    x = _patches((8, 3, 8, 8))
    aug = PatchAugment(color_jitter=0.05)
    cpu = aug(x, torch.Generator().manual_seed(3))
    gpu = aug(x.cuda(), torch.Generator().manual_seed(3))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)
