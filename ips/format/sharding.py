"""The zarr v3 chunk layout ips reads and writes, in one place: the patch reader (`ips.data.chunk_io`) and
the store writer (`data_prep.writer`) both build a `ShardLayout` from an array and use its methods.

What a layout says (zarr v3 spec, `sharding_indexed` codec and chunk key encodings):

- a shard (or an unsharded chunk) is stored under the array's chunk key (`c/0/1/2` for the default
  encoding with separator `/`, `0.1.2` for the `v2` encoding);
- a shard is its inner chunks' encoded bytes, then (index_location `end`; `start` puts it first) the
  index: one `(offset, nbytes)` uint64 little-endian pair per inner chunk in C order, `2**64 - 1` for a
  chunk that is not written (the fill value stands for it), followed by the crc32c (little-endian
  uint32) of the index bytes when the index codecs end in `crc32c`;
- an inner chunk is `bytes` (C order, the `endian` given for multi-byte dtypes) then at most one
  compressor: zstd, blosc or gzip (`CODECS`), mapped to its numcodecs codec, which zarr-python uses too;
  or (uint8 images) an optional `transpose` then one image codec of `ips.format.image_codecs` (JPEG,
  JPEG XL, WebP) as the array -> bytes codec.

Layouts outside that (transpose before `bytes`, nested sharding, several compressors, big-endian index) raise
`UnsupportedLayout`: callers then fall back to zarr's own reads (the reader) or refuse (the writer).

zarr's public API is used for what it does well: the array's metadata (`Array.metadata.to_dict()`, the
spec JSON; `Array.shape/chunks/shards/fill_value/dtype`), creating arrays, and every small array and
every non-hot read. It is not used for the two hot byte paths, for speed:

- reading a patch: zarr's read path reads the shard index per request, awaits one store read per chunk
  and copies through its output buffer; the direct reader (`ips.data.chunk_io`) caches indexes,
  coalesces byte ranges and decodes straight into the output, about 0.6x zarr's CPU per patch (see
  `tools/bench_read_cpu.py` and docs/BENCHMARKS.md);
- writing a shard: zarr's write path runs its async codec pipeline per inner chunk, about 3x the cost
  of the codec itself; a conversion writes each shard once and whole, so `encode_shard` assembles it.

Both paths are checked against zarr-python in `tests/test_sharding.py` for every codec in `CODECS`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import numcodecs
import numpy as np

from ips.format import image_codecs

MISSING = np.uint64(2**64 - 1)  # index entry of an inner chunk that is not written
CODECS = ("zstd", "blosc", "gzip")  # compressors (after `bytes`) the layout handles
_BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


class UnsupportedLayout(ValueError):
    """The array's codecs are not a layout this module handles (the message says which part)."""


class CorruptShard(ValueError):
    """A shard's bytes do not match the layout (short, bad index checksum, offsets past the end)."""


def crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """The crc32c (Castagnoli) checksum of `data`, as zarr's `crc32c` codec computes it."""
    return int(google_crc32c.value(bytes(data) if isinstance(data, np.ndarray) else data))


def make_codec(spec: dict[str, Any] | None) -> numcodecs.abc.Codec | None:
    """The numcodecs codec for one zarr v3 compressor spec `{"name", "configuration"}` (None: none)."""
    if spec is None:
        return None
    name, conf = spec["name"], spec.get("configuration") or {}
    if name == "zstd":
        return numcodecs.Zstd(level=int(conf.get("level", 0)), checksum=bool(conf.get("checksum", False)))
    if name == "blosc":
        shuffle = conf.get("shuffle", "noshuffle")
        return numcodecs.Blosc(
            cname=conf.get("cname", "zstd"),
            clevel=int(conf.get("clevel", 5)),
            shuffle=_BLOSC_SHUFFLE[shuffle] if isinstance(shuffle, str) else int(shuffle),
            blocksize=int(conf.get("blocksize", 0)),
        )
    if name == "gzip":
        return numcodecs.GZip(level=int(conf.get("level", 5)))
    raise UnsupportedLayout(f"compressor {name!r} (handled: {', '.join(CODECS)})")


@dataclass(frozen=True)
class ImageChain:
    """An inner chain `[transpose(order)] + image codec`: codec short name, its quality, the transpose."""

    name: str
    level: int
    order: tuple[int, ...] | None


def _image_chain(codecs: Sequence[dict[str, Any]]) -> ImageChain | None:
    """The image chain of `codecs`, None when they do not end in an image codec (then `bytes` rules)."""
    names = [c["name"] for c in codecs]
    short = image_codecs.short_name(names[-1]) if names else None
    if short is None:
        return None
    order = None
    if names[:-1] == ["transpose"]:
        order = tuple(int(i) for i in codecs[0]["configuration"]["order"])
    elif names[:-1]:
        raise UnsupportedLayout(f"inner codecs {names} (handled: [transpose] + one image codec)")
    level = (codecs[-1].get("configuration") or {}).get("level")
    return ImageChain(short, int(level) if level is not None else image_codecs.DEFAULT_LEVEL[short], order)


def _inner_chain(codecs: Sequence[dict[str, Any]]) -> tuple[str | None, dict[str, Any] | None]:
    """`(endian, compressor spec or None)` of a `bytes [+ compressor]` chain."""
    if not codecs or codecs[0]["name"] != "bytes":
        raise UnsupportedLayout(f"inner codecs {[c['name'] for c in codecs]} do not start with 'bytes'")
    endian = (codecs[0].get("configuration") or {}).get("endian")
    rest = list(codecs[1:])
    if len(rest) > 1:
        raise UnsupportedLayout(f"more than one compressor: {[c['name'] for c in rest]}")
    if rest and rest[0]["name"] not in CODECS:
        raise UnsupportedLayout(f"compressor {rest[0]['name']!r} (handled: {', '.join(CODECS)})")
    return endian, (rest[0] if rest else None)


def _index_crc(index_codecs: Sequence[dict[str, Any]]) -> bool:
    """Whether the shard index ends in a crc32c; raises for anything but little-endian bytes [+ crc32c]."""
    names = [c["name"] for c in index_codecs]
    endian = (index_codecs[0].get("configuration") or {}).get("endian", "little") if index_codecs else None
    if names not in (["bytes"], ["bytes", "crc32c"]) or endian != "little":
        raise UnsupportedLayout(f"index codecs {names} ({endian}-endian)")
    return names == ["bytes", "crc32c"]


@dataclass(frozen=True)
class ShardLayout:
    """The on-disk layout of one zarr v3 array (see the module docstring).

    `chunk_shape` is the inner chunk, `shard_shape` the shard (None: unsharded, each chunk its own key);
    `stored_dtype` the dtype with the byte order the `bytes` codec writes; `compressor` the zarr spec of
    the compressor (None: raw bytes).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    stored_dtype: np.dtype
    chunk_shape: tuple[int, ...]
    shard_shape: tuple[int, ...] | None
    compressor: dict[str, Any] | None
    fill_value: Any
    index_at_end: bool = True
    index_crc: bool = True
    key_prefix: str = "c"
    key_separator: str = "/"
    codec: numcodecs.abc.Codec | None = field(default=None, compare=False, repr=False)
    image: ImageChain | None = None

    @classmethod
    def of(cls, array: Any) -> ShardLayout:
        """The layout of a zarr v3 `zarr.Array`; raises UnsupportedLayout for anything else."""
        meta = array.metadata.to_dict()
        if meta.get("zarr_format") != 3:
            raise UnsupportedLayout(f"zarr format {meta.get('zarr_format')} (only v3)")
        enc = meta["chunk_key_encoding"]
        sep = (enc.get("configuration") or {}).get("separator", "/" if enc["name"] == "default" else ".")
        prefix = {"default": "c", "v2": ""}.get(enc["name"])
        if prefix is None:
            raise UnsupportedLayout(f"chunk key encoding {enc['name']!r}")
        codecs = meta["codecs"]
        dtype = np.dtype(array.dtype)
        shard_shape: tuple[int, ...] | None = None
        index_at_end, index_crc = True, False
        if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
            conf = codecs[0]["configuration"]
            index_crc = _index_crc(conf["index_codecs"])
            index_at_end = conf.get("index_location", "end") == "end"
            codecs = conf["codecs"]
            shard_shape = tuple(int(s) for s in array.shards)
        image = _image_chain(codecs)
        if image is not None and dtype != np.uint8:
            raise UnsupportedLayout(f"image codec {image.name} on {dtype} (uint8 only)")
        endian, compressor = _inner_chain(codecs) if image is None else (None, None)
        stored = dtype.newbyteorder("<" if endian != "big" else ">") if dtype.itemsize > 1 else dtype
        return cls(
            shape=tuple(int(n) for n in array.shape),
            dtype=dtype,
            stored_dtype=stored,
            chunk_shape=tuple(int(c) for c in array.chunks),
            shard_shape=shard_shape,
            compressor=compressor,
            fill_value=array.fill_value,
            index_at_end=index_at_end,
            index_crc=index_crc,
            key_prefix=prefix,
            key_separator=sep,
            codec=make_codec(compressor),
            image=image,
        )

    # --- keys ----------------------------------------------------------------------------------------

    @property
    def sharded(self) -> bool:
        return self.shard_shape is not None

    @property
    def chunks_per_shard(self) -> tuple[int, ...]:
        """Inner chunks per shard along each axis (all 1 when unsharded)."""
        if self.shard_shape is None:
            return (1,) * len(self.chunk_shape)
        return tuple(s // c for s, c in zip(self.shard_shape, self.chunk_shape))

    def key(self, coords: Iterable[int]) -> str:
        """The store key of the shard (or unsharded chunk) at grid position `coords`, relative to the
        array's folder: `c/0/1/2` (default encoding) or `0.1.2` (v2 encoding)."""
        parts = [str(int(c)) for c in coords]
        return self.key_separator.join([self.key_prefix, *parts] if self.key_prefix else parts or ["0"])

    # --- the shard index -----------------------------------------------------------------------------

    @property
    def index_body_nbytes(self) -> int:
        return 16 * int(np.prod(self.chunks_per_shard))

    @property
    def index_nbytes(self) -> int:
        return self.index_body_nbytes + (4 if self.index_crc else 0)

    def decode_index(self, raw: bytes | memoryview) -> np.ndarray:
        """uint64 `(*chunks_per_shard, 2)` (offset, nbytes) from the index bytes; raises CorruptShard if
        they are short or their crc32c does not match."""
        if len(raw) != self.index_nbytes:
            raise CorruptShard(f"shard index is {len(raw)} bytes, expected {self.index_nbytes} (truncated)")
        body = raw[: self.index_body_nbytes]
        if self.index_crc:
            stored = int(np.frombuffer(raw[self.index_body_nbytes :], dtype="<u4")[0])
            if crc32c(body) != stored:
                raise CorruptShard("shard index checksum (crc32c) does not match")
        return np.frombuffer(body, dtype="<u8").reshape(*self.chunks_per_shard, 2)

    def encode_index(self, index: np.ndarray) -> bytes:
        """The index bytes of `index` uint64 `(*chunks_per_shard, 2)`, with its crc32c if the layout has one."""
        body = np.ascontiguousarray(index, dtype="<u8").tobytes()
        return body + (np.uint32(crc32c(body)).astype("<u4").tobytes() if self.index_crc else b"")

    def check_index(self, index: np.ndarray, shard_nbytes: int) -> None:
        """Raise CorruptShard if a written chunk of `index` lies outside a shard of `shard_nbytes` bytes."""
        entries = index.reshape(-1, 2)
        present = entries[entries[:, 0] != MISSING]
        data_lo = 0 if self.index_at_end else self.index_nbytes
        data_hi = shard_nbytes - (self.index_nbytes if self.index_at_end else 0)
        if len(present) and (
            int(present[:, 0].min()) < data_lo or int((present[:, 0] + present[:, 1]).max()) > data_hi
        ):
            raise CorruptShard(f"chunk byte ranges reach past the shard's {shard_nbytes} bytes (truncated)")

    # --- chunks ----------------------------------------------------------------------------------------

    def encode_chunk(self, chunk: np.ndarray) -> bytes:
        """Encoded bytes of one inner chunk `chunk_shape` (in `dtype`)."""
        if self.image is not None:
            tile = chunk if self.image.order is None else chunk.transpose(self.image.order)  # (y, x, C)
            return image_codecs.encode(self.image.name, self.image.level, tile)
        raw = np.ascontiguousarray(chunk, dtype=self.stored_dtype)
        return bytes(self.codec.encode(raw)) if self.codec is not None else raw.tobytes()

    def decode_chunk(self, data: bytes | memoryview) -> np.ndarray:
        """One inner chunk `chunk_shape` in `dtype` from its encoded bytes; raises ValueError (or the
        codec's error) if they do not decode to exactly one chunk."""
        if self.image is not None:
            return self.decode_image(data)
        raw = self.codec.decode(data) if self.codec is not None else data
        flat = np.frombuffer(raw, dtype=self.stored_dtype)
        if flat.size != int(np.prod(self.chunk_shape)):
            raise ValueError(
                f"decoded {flat.nbytes} bytes, expected {int(np.prod(self.chunk_shape)) * flat.itemsize}"
            )
        return flat.reshape(self.chunk_shape).astype(self.dtype, copy=False)

    def decode_image(self, data: bytes | memoryview) -> np.ndarray:
        """One inner chunk `chunk_shape` of an image chain: the codec's `(y, x[, C])` tile, transposed back
        (a view); ValueError if it has another size."""
        assert self.image is not None
        tile = image_codecs.decoder(self.image.name)(data)
        order = self.image.order
        stored = self.chunk_shape if order is None else tuple(self.chunk_shape[i] for i in order)
        if tile.size != int(np.prod(stored)):
            raise ValueError(f"decoded a {tile.shape} image, expected {stored}")
        tile = tile.reshape(stored)
        return tile if order is None else tile.transpose(np.argsort(order))

    def encode_shard(self, chunks: Iterable[tuple[tuple[int, ...], bytes]]) -> bytes | None:
        """A whole shard from `(position within the shard, encoded bytes)` of its written chunks (in
        any order; absent chunks are unwritten); None when no chunk is written (store nothing)."""
        index = np.full((*self.chunks_per_shard, 2), MISSING, dtype="<u8")
        parts: list[bytes] = []
        offset = 0 if self.index_at_end else self.index_nbytes
        for pos, data in chunks:
            index[tuple(pos)] = (offset, len(data))
            parts.append(data)
            offset += len(data)
        if not parts:
            return None
        index_bytes = self.encode_index(index)
        return b"".join([*parts, index_bytes] if self.index_at_end else [index_bytes, *parts])
