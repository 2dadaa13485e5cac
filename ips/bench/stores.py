"""Benchmark stores: N-patch slides written by the real writer, in seconds and a few hundred KB.

A large store is mostly background: the image given to `data_prep.convert.convert_array` is a
zero-copy broadcast of the background value (no pixel memory), with a full tissue mask, so every grid
cell is a patch while its chunks stay unwritten (the fill value stands for them). A fixed band of
`tissue_patches` patches then gets real pixels (written chunks, decoded on read), the same amount at
every N. Stores are named by their parameters and reused when complete.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import zarr

BACKGROUND = 255


def textured(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """uint8 `(C, *spatial)` that compresses like tissue (smooth blobs plus noise), not like noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 220, size=(shape[0], *(max(1, -(-s // 8)) for s in shape[1:])), dtype=np.uint8)
    img = coarse
    for ax in range(1, len(shape)):
        img = np.repeat(img, 8, axis=ax)
    img = img[(slice(None), *(slice(0, s) for s in shape[1:]))]
    return (img + rng.integers(0, 16, size=shape, dtype=np.uint8)).astype(np.uint8)


def bench_store(
    root: str | Path,
    n_patches: int,
    *,
    patch_size: int,
    channels: int = 3,
    tissue_patches: int | None = 1024,
    seed: int = 0,
    codec: str = "blosc-lz4",
    codec_level: int | None = None,
) -> Path:
    """A 2D store with a grid of exactly `n_patches` patches of `patch_size` (stride = patch size).

    The image is `ceil(sqrt(N))` patches square; the mask keeps the first N grid cells in row-major
    order. `tissue_patches`: the first rows holding about that many patches get real pixels (None:
    all of them, for throughput measurements). `codec`, `codec_level`: the pixel codec, as `ips prep
    --codec/--codec-level` (lossy ones need `channels` 1 or 3). Returns `root/<name>.zarr` (reused if
    complete).
    """
    from data_prep.writer import reseal

    if n_patches < 1 or patch_size < 1:
        raise ValueError(f"n_patches and patch_size must be >= 1, got {n_patches}, {patch_size}")
    side = math.ceil(math.sqrt(n_patches))
    rows = math.ceil(n_patches / side)
    band = rows if tissue_patches is None else min(rows, math.ceil(tissue_patches / side))
    name = (
        f"bench_n{n_patches}_p{patch_size}_c{channels}_t{'all' if tissue_patches is None else band}_s{seed}"
    )
    if codec != "blosc-lz4" or codec_level is not None:  # the default keeps its old name (reused stores)
        name += f"_{codec}" + ("" if codec_level is None else f"{codec_level}")
    shape = (channels, rows * patch_size, side * patch_size)
    if band == rows:  # every patch is tissue: a real image (throughput stores are small)
        image = textured(shape, seed)
    else:  # no pixel memory: a read-only broadcast of the background value
        image = np.broadcast_to(np.uint8(BACKGROUND), shape)
    store = grid_store(
        image, root, name, n_patches=n_patches, patch_size=patch_size, codec=codec, codec_level=codec_level
    )
    if band < rows:  # the band of real pixels, written into level 0's chunks (again on reuse: idempotent)
        level0 = zarr.open_array(str(store / "0"), mode="r+")
        level0[:, : band * patch_size, :] = textured((channels, band * patch_size, shape[2]), seed)
        reseal(store, ["0"])  # record the new shards in the completion marker
    return store


def grid_store(
    image: np.ndarray,
    root: str | Path,
    name: str,
    *,
    n_patches: int,
    patch_size: int,
    codec: str = "blosc-lz4",
    codec_level: int | None = None,
) -> Path:
    """`root/<name>.zarr` from `image` `(C, rows * P, cols * P)` with a grid of its first `n_patches`
    cells (row-major) of `patch_size` P, stride P, level 0, as `ips prep` makes it (reused if complete)."""
    from data_prep.convert import PrepOptions, convert_array

    rows, side = image.shape[1] // patch_size, image.shape[2] // patch_size
    mask = np.zeros(rows * side, dtype=bool)  # one pixel per cell: the first N cells are tissue
    mask[:n_patches] = True
    options = PrepOptions(
        patch_size=patch_size,
        stride=patch_size,
        level=0,
        min_tissue=0.5,
        thumbnail=False,
        hash_source=False,
        pyramid_max_size=max(512, patch_size),
        codec=codec,
        codec_level=codec_level,
    )
    return convert_array(
        image, root, name, options=options, background=BACKGROUND, mask=mask.reshape(rows, side)
    )
