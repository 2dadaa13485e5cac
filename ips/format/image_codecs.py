"""Lossy image codecs for RGB / grey slide chunks (JPEG, JPEG XL, WebP through imagecodecs), as zarr v3
codecs, in one place: the store writer (`data_prep.writer`), the layout (`ips.format.sharding`) and zarr
itself (reads through `zarr.open_array`, `ips verify`, the viewer) all use what is defined here.

Chunk layout: a pyramid array is `(C, Y, X)` with chunks `(C, cy, cx)`; an image codec wants `(y, x, c)`
tiles, so the inner codec chain is `transpose(order=[1, 2, 0])` (a core zarr v3 codec) then the image
codec as the array -> bytes codec (`IMAGE_ORDER`).

Codec names and configuration are those of imagecodecs' own zarr v3 codecs (`imagecodecs.zarr`, shipped
with imagecodecs >= 2026.10 and registered by the `imagecodecs-zarr` package: `imagecodecs_jpeg`,
`imagecodecs_jpegxl`, `imagecodecs_webp` with `{"level": q}`), so a zarr-python with that package opens
these stores too. Where it is installed its classes serve zarr; otherwise ours (`register`), which need
only the imagecodecs functions present since 2022. These names are not in the zarr v3 core spec: most
other readers cannot decode such arrays (docs/BENCHMARKS.md, "Store size and codecs").

Only uint8 images with 1 or 3 channels (2D) can use them; masks, grids and thumbnails stay lossless.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import parse_named_configuration

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

# short name (the `--codec` value) -> zarr v3 codec name
NAMES = {"jpeg": "imagecodecs_jpeg", "jpegxl": "imagecodecs_jpegxl", "webp": "imagecodecs_webp"}
# default quality: >= 40 dB PSNR on the real H&E slide for jpeg and jpegxl (docs/BENCHMARKS.md); WebP's
# lossy mode is 4:2:0 only and stays near 34 dB at any quality there
DEFAULT_LEVEL = {"jpeg": 90, "jpegxl": 93, "webp": 90}
IMAGE_ORDER = (1, 2, 0)  # (C, y, x) -> (y, x, C): the transpose before the image codec


def encode(name: str, level: int, tile: np.ndarray) -> bytes:
    """Encode one uint8 tile `(y, x, C)` (C 1 or 3) with codec `name` (a key of NAMES) at quality `level`.

    JPEG keeps full-resolution chroma (4:4:4) and optimises its Huffman tables: with 4:2:0 the chroma of an
    already decoded slide does not survive (33 dB at any quality on the real slide, 43 dB with 4:4:4).
    """
    import imagecodecs

    tile = np.ascontiguousarray(tile[..., 0] if tile.shape[-1] == 1 else tile)
    if name == "jpeg":
        return bytes(imagecodecs.jpeg8_encode(tile, level=level, subsampling="444", optimize=True))
    if name == "jpegxl":
        return bytes(imagecodecs.jpegxl_encode(tile, level=level, effort=3))
    if name == "webp":
        return bytes(imagecodecs.webp_encode(tile, level=level, lossless=False))
    raise ValueError(f"unknown image codec {name!r}; choose from {', '.join(NAMES)}")


def decoder(name: str) -> Any:
    """`decode(data) -> (y, x[, C])` uint8 for codec `name` (GIL released while decoding)."""
    import imagecodecs

    return {
        "jpeg": imagecodecs.jpeg8_decode,
        "jpegxl": imagecodecs.jpegxl_decode,
        "webp": imagecodecs.webp_decode,
    }[name]


def short_name(codec_name: str) -> str | None:
    """`imagecodecs_jpeg` -> `jpeg` (None for a codec that is not one of ours)."""
    return next((k for k, v in NAMES.items() if v == codec_name), None)


@dataclass(frozen=True)
class ImageCodec(ArrayBytesCodec):
    """A zarr v3 array -> bytes codec for `(y, x, C)` uint8 chunks; subclasses set `short`."""

    is_fixed_size = False
    short: ClassVar[str] = ""
    level: int = 90

    def __init__(self, *, level: int | None = None) -> None:
        object.__setattr__(self, "level", DEFAULT_LEVEL[self.short] if level is None else int(level))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageCodec:
        _, config = parse_named_configuration(data, NAMES[cls.short], require_configuration=False)
        return cls(level=(config or {}).get("level"))

    def to_dict(self) -> dict[str, Any]:
        return {"name": NAMES[self.short], "configuration": {"level": self.level}}

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        decoded = decoder(self.short)(chunk_bytes.as_numpy_array())
        return chunk_spec.prototype.nd_buffer.from_numpy_array(decoded.reshape(chunk_spec.shape))

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer:
        data = encode(self.short, self.level, chunk_array.as_numpy_array())
        return chunk_spec.prototype.buffer.from_bytes(data)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError


class JpegCodec(ImageCodec):
    short = "jpeg"


class JpegXlCodec(ImageCodec):
    short = "jpegxl"


class WebpCodec(ImageCodec):
    short = "webp"


CLASSES: dict[str, type[ImageCodec]] = {"jpeg": JpegCodec, "jpegxl": JpegXlCodec, "webp": WebpCodec}


def register() -> None:
    """Make zarr resolve the codec names: ours, unless a package (imagecodecs-zarr) already provides one
    (two implementations of a name make zarr warn on every open)."""
    from zarr.registry import get_codec_class, register_codec

    for short, name in NAMES.items():
        try:
            get_codec_class(name)
        except KeyError:
            register_codec(name, CLASSES[short])


def make(name: str, level: int | None = None) -> ImageCodec:
    """The zarr v3 codec object for `--codec name` at quality `level` (None: DEFAULT_LEVEL)."""
    register()
    return CLASSES[name](level=level)


register()
