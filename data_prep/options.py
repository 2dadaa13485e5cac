"""`PrepOptions`: how a slide or volume becomes a store (light to import: the CLI builds its parser
from it without loading zarr or scikit-image)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ips.errors import ConfigError
from ips.format.names import DEFAULT_GRID

LOSSY_CODECS = ("jpeg", "jpegxl", "webp")  # uint8 RGB / grey 2D only (ips.format.image_codecs)
DEFAULT_CODEC = "zstd"  # lossless (docs/BENCHMARKS.md "Store size and codecs": size against read speed)
CODECS = ("zstd", "blosc-lz4", "none", *LOSSY_CODECS)
STORE_FROM = ("level0", "grid")


def per_axis(value: int | tuple[int, ...], dims: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    if len(value) != dims:
        raise ConfigError(f"prep.{name}: needs 1 or {dims} values for a {dims}D image, got {value}")
    return value


@dataclass(frozen=True)
class PrepOptions:
    """How a slide or volume becomes a store; validated on construction (ConfigError names the field).

    Grid: `patch_size` and `stride` in pixels of the grid's level (an int, or one per spatial axis);
    the level is `level`, or the pyramid level nearest to `mpp` micrometers per pixel (within
    `mpp_tolerance`, relative; `source_mpp`, where given, is the source's level-0 pixel size in place of
    its metadata's); patches with a tissue fraction >= `min_tissue` are kept. Store:
    `codec` (lossless: zstd level 1, the default, blosc-lz4, none; lossy, for uint8 RGB / grey slides: jpeg, jpegxl, webp at
    quality `codec_level` 1-100; see `data_prep.writer`), `shard_chunks` chunks per shard side (None: 8 in 2D, 4 in 3D),
    pyramid down to `pyramid_max_size` pixels on the longest y/x side; the mask on the first level at
    about `mask_mpp` micrometers per pixel (when the spacing is known) whose longest side is also
    <= `mask_max_size` (None: 2048 in 2D, 256 in 3D counting z). `store_from`: `level0` stores the
    source's level 0 and the pyramid below it; `grid` starts the store at the grid's level (its level 0
    is then that level of the source; `ips.source_level` records which). `threads` decode and
    encode in parallel (0: up to 8, as many as CPUs). `allow_empty`: keep a store whose grid is empty
    (else that input fails with "no tissue").
    """

    patch_size: int | tuple[int, ...] = 256
    stride: int | tuple[int, ...] | None = None
    level: int = 0
    mpp: float | None = None
    source_mpp: float | None = None
    min_tissue: float = 0.5
    grid_name: str = DEFAULT_GRID
    mpp_tolerance: float = 0.25
    codec: str = DEFAULT_CODEC
    codec_level: int | None = None
    store_from: str = "level0"
    shard_chunks: int | None = None
    pyramid_max_size: int = 512
    mask_max_size: int | None = None
    mask_mpp: float | None = 4.0
    min_object_um2: float = 2500.0
    max_hole_um2: float = 2500.0
    threads: int = 0
    thumbnail: bool = True
    thumbnail_size: int = 1024
    overwrite: bool = False
    allow_empty: bool = False
    hash_source: bool = True

    def __post_init__(self) -> None:
        def require(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"prep.{key}: {msg}")

        for key in ("patch_size", "stride"):
            v = getattr(self, key)
            if v is None:
                continue
            vals = (v,) if isinstance(v, int) else tuple(v)
            require(
                len(vals) in (1, 2, 3) and all(isinstance(x, (int, np.integer)) and x >= 1 for x in vals),
                key,
                f"must be an integer >= 1 (or one per axis), got {v!r}",
            )
        require(isinstance(self.level, int) and self.level >= 0, "level", f"must be >= 0, got {self.level!r}")
        require(self.source_mpp is None or self.source_mpp > 0, "source_mpp", "must be > 0")
        if self.mpp is not None:
            require(self.mpp > 0, "mpp", f"must be > 0, got {self.mpp}")
            require(self.level == 0, "level", "give a level or mpp, not both")
        require(0.0 <= self.min_tissue <= 1.0, "min_tissue", f"must be in [0, 1], got {self.min_tissue}")
        require(
            bool(self.grid_name) and "/" not in self.grid_name and not self.grid_name.startswith("."),
            "grid_name",
            f"must be a plain name, got {self.grid_name!r}",
        )
        require(self.mpp_tolerance > 0, "mpp_tolerance", "must be > 0")
        require(self.codec in CODECS, "codec", f"must be one of {CODECS}, got {self.codec!r}")
        if self.codec in LOSSY_CODECS and self.codec_level is not None:
            require(1 <= self.codec_level <= 100, "codec_level", f"quality 1-100, got {self.codec_level}")
        require(
            self.store_from in STORE_FROM,
            "store_from",
            f"must be one of {STORE_FROM}, got {self.store_from!r}",
        )
        require(self.shard_chunks is None or self.shard_chunks >= 1, "shard_chunks", "must be >= 1")
        require(self.pyramid_max_size >= 1, "pyramid_max_size", "must be >= 1")
        require(self.mask_max_size is None or self.mask_max_size >= 8, "mask_max_size", "must be >= 8")
        require(self.mask_mpp is None or self.mask_mpp > 0, "mask_mpp", "must be > 0 or None")
        require(self.min_object_um2 >= 0 and self.max_hole_um2 >= 0, "min_object_um2", "areas must be >= 0")
        require(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")
        require(self.thumbnail_size >= 16, "thumbnail_size", "must be >= 16")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def n_threads(self) -> int:
        return self.threads or max(1, min(8, os.cpu_count() or 1))
