"""Image readers: one interface (`ImageReader`), one subclass per backend.

Every reader exposes the level-0 image as `(C, Y, X)` (2D) or `(C, Z, Y, X)` (3D), with the physical
size of a pixel in micrometers (`spacing`, `(sy, sx)` or `(sz, sy, sx)`, None when the source has none)
and reads *regions* (`read_region(start, size)`), never the whole image, so host memory is bounded by
the region. Coordinates are `(row, col)` / `(z, row, col)`; the conversion to OpenSlide's `(x, y)`
happens in one place, `_openslide_xy`.

Backends: `openslide` (vendor slides: SVS, NDPI, MRXS, SCN, Philips TIFF, Ventana, DICOM, and any
tiled TIFF it opens), `tifffile` (OME-TIFF, plain / tiled / pyramidal TIFF, TIFF stacks as 3D),
`nifti` (nibabel), `npy` (numpy, memory-mapped) and `array` (an in-memory array, for `convert_array`).
`open_reader` picks one from the file's content (magic bytes, `openslide.OpenSlide.detect_format`).
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import threading
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ips.errors import PrepError

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
NPY_MAGIC = b"\x93NUMPY"
GZIP_MAGIC = b"\x1f\x8b"
NIFTI_MAGIC = (b"n+1\x00", b"ni1\x00", b"n+2\x00", b"ni2\x00")
# micrometers per unit of a TIFF ResolutionUnit / an ImageJ or OME unit string
_UM_PER_UNIT = {
    "INCH": 25400.0,
    "CENTIMETER": 1e4,
    "MILLIMETER": 1e3,
    "MICROMETER": 1.0,
    "um": 1.0,
    "µm": 1.0,
    "\\u00B5m": 1.0,
    "micron": 1.0,
    "micrometer": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "meter": 1e6,
    "inch": 25400.0,
}


class ImageReader(ABC):
    """A level-0 image read region by region.

    Attributes:
        shape: `(C, Y, X)` or `(C, Z, Y, X)`.
        dtype: pixel dtype (uint8 for slides; the source dtype for volumes).
        spacing: micrometers per pixel `(sy, sx)` / `(sz, sy, sx)`, or None when unknown.
        background: the value of empty glass / empty space (fill value of the store).
        vendor: a short format name for provenance (`aperio`, `ome-tiff`, `nifti1`, ...).
        affine: for NIfTI, the 4x4 voxel (i, j, k) -> world (RAS, mm) matrix as nested lists, else None.
        mpp_override: `{"mpp", "file_mpp"}` where `open_reader(mpp=...)` replaced the file's pixel size.
    """

    name: ClassVar[str]
    shape: tuple[int, ...]
    dtype: np.dtype
    spacing: tuple[float, ...] | None = None
    background: float = 0
    vendor: str = ""
    affine: list[list[float]] | None = None
    path: Path | None = None
    mpp_override: dict[str, Any] | None = None

    @property
    def spatial_dims(self) -> int:
        return len(self.shape) - 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[1:])

    @classmethod
    @abstractmethod
    def accepts(cls, path: Path, head: bytes) -> bool:
        """Whether this backend recognises the file from its content (`head`: its first 1 KiB)."""

    @abstractmethod
    def _read(self, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
        """The region `[start, start + size)` (spatial, in bounds): array `(C, *size)`."""

    def read_region(self, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
        """Level-0 region at `start` (row, col) / (z, row, col) of `size`: `(C, *size)` of `dtype`.

        Thread-safe: the writer calls it from several threads at once.
        """
        start, size = tuple(int(s) for s in start), tuple(int(s) for s in size)
        dims = self.spatial_dims
        if len(start) != dims or len(size) != dims:
            raise ValueError(f"region needs {dims} start and size values, got {start}, {size}")
        for s, n, full in zip(start, size, self.spatial_shape):
            if s < 0 or n < 1 or s + n > full:
                raise ValueError(f"region {start}+{size} is outside the image {self.spatial_shape}")
        out = self._read(start, size)
        expected = (self.shape[0], *size)
        if out.shape != expected:  # a backend bug or a lying file: never write a wrong shape
            raise PrepError(
                f"reader {self.name} returned shape {out.shape} for region {start}+{size}, "
                f"expected {expected}"
            )
        return out

    def native_levels(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """`(downsample, spatial shape)` of each pyramid level the source holds itself, level 0 first.

        Only levels whose per-axis downsample from level 0 is a power of two and whose sides are
        `n // f` or `ceil(n / f)` are listed (the levels `read_level_region` reads); the base has none
        but level 0."""
        return [((1,) * self.spatial_dims, self.spatial_shape)]

    def read_level_region(self, level: int, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
        """Region `[start, start + size)` (pixels of native level `level`): `(C, *size)` of `dtype`."""
        if level == 0:
            return self.read_region(start, size)
        shape = self.native_levels()[level][1]
        for s, n, full in zip(start, size, shape):
            if s < 0 or n < 1 or s + n > full:
                raise ValueError(f"region {start}+{size} is outside level {level} {shape}")
        out = self._read_level(level, tuple(int(s) for s in start), tuple(int(n) for n in size))
        if out.shape != (self.shape[0], *size):
            raise PrepError(f"reader {self.name} returned shape {out.shape} for level {level} {start}+{size}")
        return out

    def _read_level(self, level: int, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError(f"reader {self.name} has no native level {level}")

    def metadata(self) -> dict[str, Any]:
        """Extra provenance (JSON-able) for the store's attributes."""
        return {}

    def file_levels(self) -> int:
        """How many resolution levels the file itself holds (1: not pyramidal)."""
        return len(self.native_levels())

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- OpenSlide ---------------------------------------------------------------------------------------


def _openslide_xy(rowcol: tuple[int, int]) -> tuple[int, int]:
    """(row, col) -> OpenSlide's (x, y). The only place this order conversion happens."""
    row, col = rowcol
    return col, row


class OpenSlideReader(ImageReader):
    """Vendor whole-slide formats through OpenSlide: RGB uint8, transparent pixels composited onto the
    slide's background colour (white unless the slide says otherwise)."""

    name = "openslide"

    def __init__(self, path: str | Path) -> None:
        import openslide

        self.path = Path(path)
        try:
            self._slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as e:
            raise PrepError(f"OpenSlide cannot open it ({e})") from None
        props = self._slide.properties
        width, height = self._slide.dimensions
        self.shape = (3, height, width)
        self.dtype = np.dtype(np.uint8)
        mpp_y, mpp_x = props.get("openslide.mpp-y"), props.get("openslide.mpp-x")
        self.spacing = (float(mpp_y), float(mpp_x)) if mpp_y and mpp_x else None
        bg = props.get("openslide.background-color", "FFFFFF")
        self._bg_rgb = np.array([int(bg[i : i + 2], 16) for i in (0, 2, 4)], np.uint8)
        self.background = 255 if (self._bg_rgb == 255).all() else int(self._bg_rgb.mean())
        self.vendor = props.get("openslide.vendor", "openslide")
        self._props = {k: v for k, v in props.items() if k.startswith("openslide.")}

    @classmethod
    def accepts(cls, path: Path, head: bytes) -> bool:
        import openslide

        try:
            fmt = openslide.OpenSlide.detect_format(str(path))
        except Exception:  # noqa: BLE001 - detection must never crash the sniffing
            return False
        # plain tiled TIFFs go to tifffile (same pixels, no RGBA round trip, any dtype)
        return fmt is not None and fmt != "generic-tiff"

    def _read(self, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
        import openslide

        try:
            img = self._slide.read_region(_openslide_xy(start), 0, _openslide_xy(size))
        except openslide.OpenSlideError as e:
            raise PrepError(f"corrupt or truncated: OpenSlide failed at region {start}: {e}") from None
        rgba = np.asarray(img)  # (h, w, 4), un-premultiplied
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        if not (alpha == 255).all():  # outside the scanned area: composite onto the background colour
            a = alpha.astype(np.uint16)
            rgb = ((rgb * a + self._bg_rgb * (255 - a) + 127) // 255).astype(np.uint8)
        return rgb.transpose(2, 0, 1)  # (3, h, w)

    def metadata(self) -> dict[str, Any]:
        return {"openslide_properties": self._props}

    def file_levels(self) -> int:
        return int(self._slide.level_count)

    def close(self) -> None:
        self._slide.close()


# --- tifffile ----------------------------------------------------------------------------------------


class TiffReader(ImageReader):
    """TIFF through tifffile: OME-TIFF, plain, tiled and pyramidal TIFF (level 0 is read), and stacks of
    pages as 3D (`(C, Z, Y, X)`). Tiles and strips are read with `os.pread` and decoded by tifffile's
    codecs (imagecodecs, which releases the GIL), so regions decode in parallel threads."""

    name = "tifffile"
    _Z_AXES = "ZIQ"
    _C_AXES = "CS"

    def __init__(self, path: str | Path) -> None:
        import tifffile

        self.path = Path(path)
        tiff_log = logging.getLogger("tifffile")
        level = tiff_log.level
        tiff_log.setLevel(logging.CRITICAL)  # its warnings about a bad file become our one-line reason
        tif = None
        try:
            tif = tifffile.TiffFile(str(path))
            series = tif.series[0]
            keyframe = series.keyframe
        except Exception as e:  # noqa: BLE001 - tifffile raises many types for a bad file
            if tif is not None:
                tif.close()
            raise PrepError(f"corrupt or truncated TIFF: {type(e).__name__}: {e}") from None
        finally:
            tiff_log.setLevel(level)
        self._tif = tif
        try:
            self._setup(series, keyframe)
        except BaseException:
            self._tif.close()
            raise

    def _setup(self, series: Any, keyframe: Any) -> None:
        path = self.path
        self._size = os.path.getsize(path)
        self._page_lock = threading.Lock()
        self._fd = self._tif.filehandle.fileno()
        self._series = series
        self._kf = keyframe
        if getattr(keyframe, "imagedepth", 1) > 1:
            raise PrepError("unsupported TIFF: volumetric tiles (ImageDepth > 1)")
        page_axes, axes, shape = keyframe.axes, series.axes, series.shape
        if not axes.endswith(page_axes) or page_axes not in ("YX", "YXS", "SYX"):
            raise PrepError(f"unsupported TIFF layout: axes {axes} with page axes {page_axes}")
        lead_axes, lead_shape = axes[: len(axes) - len(page_axes)], shape[: len(axes) - len(page_axes)]
        if math.prod(lead_shape) != len(series.pages):
            raise PrepError(f"unsupported TIFF layout: {len(series.pages)} pages for axes {axes} {shape}")
        self._lead_shape = lead_shape
        self._c_lead = self._z_lead = None  # index into lead axes of the channel / z axis
        for i, (ax, n) in enumerate(zip(lead_axes, lead_shape)):
            if n == 1:
                continue
            if ax in self._C_AXES and self._c_lead is None:
                self._c_lead = i
            elif ax in self._Z_AXES and self._z_lead is None:
                self._z_lead = i
            else:
                raise PrepError(
                    f"unsupported TIFF: axis {ax!r} of size {n} in {axes} {shape} "
                    "(only channels and one z axis)"
                )
        samples = keyframe.samplesperpixel if "S" in page_axes else 1
        lead_c = lead_shape[self._c_lead] if self._c_lead is not None else 1
        if samples > 1 and lead_c > 1:
            raise PrepError(f"unsupported TIFF: both samples ({samples}) and channel pages ({lead_c})")
        height, width = keyframe.imagelength, keyframe.imagewidth
        n_z = lead_shape[self._z_lead] if self._z_lead is not None else None
        channels = samples * lead_c
        self.shape = (channels, n_z, height, width) if n_z else (channels, height, width)
        self.dtype = np.dtype(keyframe.dtype)
        self._samples = samples
        if keyframe.is_tiled:
            self._seg = (keyframe.tilelength, keyframe.tilewidth)
        else:
            self._seg = (min(keyframe.rowsperstrip or height, height), width)
        self._grid = (math.ceil(height / self._seg[0]), math.ceil(width / self._seg[1]))
        self._separate = keyframe.planarconfig == 2 and samples > 1
        self.vendor = (
            "ome-tiff" if self._tif.is_ome else ("svs" if self._tif.is_svs else series.kind or "tiff")
        )
        self.spacing = self._find_spacing()
        self.background = 255 if (self.dtype == np.uint8 and channels == 3) else 0
        self._levels: list[tuple[tuple[int, ...], tuple[int, ...], Any]] = [
            ((1,) * self.spatial_dims, self.spatial_shape, None)
        ]
        if self.spatial_dims == 2 and all(n == 1 for n in lead_shape):  # pages parsed here, not in threads
            self._levels += _tiff_levels(series, keyframe, self.spatial_shape, samples)

    @classmethod
    def accepts(cls, path: Path, head: bytes) -> bool:
        return head[:4] in TIFF_MAGIC

    def _find_spacing(self) -> tuple[float, ...] | None:
        """Micrometers per pixel from OME, SVS, ImageJ or TIFF resolution tags (in that order)."""
        yx = z = None
        tif, kf = self._tif, self._kf
        try:
            if tif.is_ome:
                pixels = next(e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels"))

                def phys(axis: str) -> float | None:
                    v = pixels.get(f"PhysicalSize{axis}")
                    unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
                    return float(v) * _UM_PER_UNIT.get(unit, 1.0) if v else None

                if phys("Y") and phys("X"):
                    yx = (phys("Y"), phys("X"))
                z = phys("Z")
            elif tif.is_svs:
                from tifffile.tifffile import svs_description_metadata

                mpp = float(svs_description_metadata(tif.pages.first.description)["MPP"])
                yx = (mpp, mpp)
            else:
                ij = tif.imagej_metadata or {}
                unit = kf.resolutionunit.name if kf.resolutionunit else "NONE"
                um = _UM_PER_UNIT.get(ij.get("unit", ""), None) if unit == "NONE" else _UM_PER_UNIT.get(unit)
                xres, yres = kf.resolution
                if um and xres > 0 and yres > 0:
                    yx = (um / yres, um / xres)
                    if ij.get("spacing"):
                        z = float(ij["spacing"]) * um
        except (StopIteration, ValueError, TypeError, KeyError, ET.ParseError):
            return None
        if yx is None:
            return None
        if self.spatial_dims == 3:
            return (z, *yx) if z else None
        return yx

    def _page(self, z: int, c: int) -> Any:
        idx = [0] * len(self._lead_shape)
        if self._z_lead is not None:
            idx[self._z_lead] = z
        if self._c_lead is not None:
            idx[self._c_lead] = c
        flat = int(np.ravel_multi_index(idx, self._lead_shape)) if idx else 0
        with self._page_lock:  # tifffile parses pages lazily through the shared file handle
            page = self._series.pages[flat]
        if page is None:
            raise PrepError(f"corrupt TIFF: page {flat} is missing")
        return page

    def _read_plane(
        self, page: Any, y0: int, x0: int, h: int, w: int, out: np.ndarray, geometry: tuple | None = None
    ) -> None:
        """Decode the tiles/strips of `page` covering the region into `out` `(S, h, w)`. `geometry`:
        `(keyframe, (tile rows, tile cols), (tiles down, tiles across))` of the page's level (level 0)."""
        kf, (th, tw), (ny, nx) = geometry or (self._kf, self._seg, self._grid)
        planes = self._samples if self._separate else 1
        for s in range(planes):
            for ty in range(y0 // th, (y0 + h - 1) // th + 1):
                for tx in range(x0 // tw, (x0 + w - 1) // tw + 1):
                    index = s * ny * nx + ty * nx + tx
                    offset, count = page.dataoffsets[index], page.databytecounts[index]
                    if count and offset + count > self._size:
                        raise PrepError(
                            f"truncated TIFF: tile {index} ends at byte {offset + count} "
                            f"but the file has {self._size}"
                        )
                    data = os.pread(self._fd, count, offset) if count else None
                    try:
                        seg, _, _ = kf.decode(data, index, jpegtables=kf.jpegtables)
                    except Exception as e:  # noqa: BLE001 - codec errors have many types
                        raise PrepError(f"corrupt TIFF: tile {index} does not decode ({e})") from None
                    # the tile's part inside the region, in tile and in region coordinates
                    ty0, tx0 = ty * th, tx * tw
                    ry0, rx0 = max(y0, ty0), max(x0, tx0)
                    ry1, rx1 = min(y0 + h, ty0 + th), min(x0 + w, tx0 + tw)
                    dst = out[:, ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0]
                    if seg is None:  # sparse (empty) tile
                        dst[s if self._separate else slice(None)] = 0
                        continue
                    part = seg[0, ry0 - ty0 : ry1 - ty0, rx0 - tx0 : rx1 - tx0, :]  # (h', w', S')
                    if part.shape[:2] != dst.shape[1:]:
                        raise PrepError(f"corrupt TIFF: tile {index} decodes to {seg.shape}")
                    if self._separate:
                        dst[s] = part[..., 0]
                    else:
                        dst[...] = part.transpose(2, 0, 1)

    def _read(self, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
        out = np.empty((self.shape[0], *size), self.dtype)
        if self.spatial_dims == 2:
            (y0, x0), (h, w) = start, size
            zs, view = [None], lambda z: out
        else:
            (z0, y0, x0), (d, h, w) = start, size
            zs, view = list(range(z0, z0 + d)), lambda z: out[:, z - z0]
        lead_c = self.shape[0] // self._samples
        for z in zs:
            plane = view(z)  # (C, h, w)
            for c in range(lead_c):
                dst = plane[c * self._samples : (c + 1) * self._samples]
                self._read_plane(self._page(z or 0, c), y0, x0, h, w, dst)
        return out

    def native_levels(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Level 0, then the series' reduced levels (pyramidal TIFF, SVS, OME-TIFF) that are exact 2**k
        downsamples with the same layout; 2D images of one page only (no channel or z pages)."""
        return [(f, shape) for f, shape, _ in self._levels]

    def _read_level(self, level: int, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
        _, _, (page, geometry) = self._levels[level]
        out = np.empty((self.shape[0], *size), self.dtype)
        self._read_plane(page, *start, *size, out, geometry)
        return out

    def metadata(self) -> dict[str, Any]:
        return {"tiff_series_axes": self._series.axes, "tiff_compression": self._kf.compression.name}

    def close(self) -> None:
        self._tif.close()


def _tiff_levels(
    series: Any, kf0: Any, shape0: tuple[int, ...], samples: int
) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[Any, tuple]]]:
    """`(downsample, shape, (page, geometry))` of each usable reduced level of a one-page 2D series."""
    found = []
    for lvl in list(getattr(series, "levels", []))[1:]:
        if len(lvl.pages) != 1:
            continue
        page = lvl.pages[0]
        kf = lvl.keyframe
        shape = (kf.imagelength, kf.imagewidth)
        factor = tuple(max(1, round(n / m)) for n, m in zip(shape0, shape))
        exact = all(m in (n // f, -(-n // f)) and f & (f - 1) == 0 for n, m, f in zip(shape0, shape, factor))
        same = kf.dtype == kf0.dtype and kf.planarconfig == kf0.planarconfig
        same = same and (kf.samplesperpixel if samples > 1 else 1) == samples and kf.axes == kf0.axes
        if not (exact and same) or factor in [f for f, _, _ in found]:
            continue
        seg = (
            (kf.tilelength, kf.tilewidth)
            if kf.is_tiled
            else (min(kf.rowsperstrip or shape[0], shape[0]), shape[1])
        )
        grid = (math.ceil(shape[0] / seg[0]), math.ceil(shape[1] / seg[1]))
        found.append((factor, shape, (page, (kf, seg, grid))))
    return found


# --- NIfTI -------------------------------------------------------------------------------------------


class NiftiReader(ImageReader):
    """NIfTI-1/2 volumes through nibabel. Voxel (i, j, k) of the file is (x, y, z) here: the array is
    `(C, Z, Y, X) = data[i, j, k, c].transpose(3, 2, 1, 0)`, and `affine` (kept from the file) maps
    (i, j, k) = (x, y, z) to world millimetres. A 4th dimension (time or vector) becomes channels."""

    name = "nifti"
    _UNIT_UM = {"mm": 1e3, "micron": 1.0, "meter": 1e6, "unknown": 1e3}

    def __init__(self, path: str | Path) -> None:
        import nibabel as nib

        self.path = Path(path)
        try:
            img = nib.load(str(path), keep_file_open=True)
            proxy = img.dataobj
            shape = proxy.shape
        except Exception as e:  # noqa: BLE001
            raise PrepError(f"corrupt NIfTI: {type(e).__name__}: {e}") from None
        if len(shape) < 3 or len(shape) > 4 and any(n > 1 for n in shape[4:]):
            raise PrepError(f"unsupported NIfTI shape {shape}: need 3 spatial dims (+ optional channels)")
        self._img, self._proxy = img, proxy
        nx, ny, nz = shape[:3]
        channels = shape[3] if len(shape) > 3 else 1
        self.shape = (channels, nz, ny, nx)
        self.dtype = np.dtype(proxy.dtype)
        zooms = img.header.get_zooms()[:3]
        unit = img.header.get_xyzt_units()[0]
        um = self._UNIT_UM.get(unit, 1e3)
        self.spacing = (float(zooms[2]) * um, float(zooms[1]) * um, float(zooms[0]) * um)
        self.affine = np.asarray(img.affine, dtype=float).tolist()
        self.vendor = type(img).__name__.lower().replace("image", "")  # nifti1 / nifti2
        self._slab: tuple[int, int, np.ndarray] | None = None
        self._lock = threading.Lock()

    @classmethod
    def accepts(cls, path: Path, head: bytes) -> bool:
        if head[:2] == GZIP_MAGIC:
            try:
                with gzip.open(path, "rb") as f:
                    head = f.read(544)
            except (OSError, EOFError):
                return False
        return head[344:348] in NIFTI_MAGIC or head[4:8] in NIFTI_MAGIC

    def _read(self, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
        (z0, y0, x0), (d, h, w) = start, size
        # A gzip stream only seeks forward cheaply: read whole z-slabs (contiguous in the file) and keep
        # the last one, so the writer's region order reads the file once.
        with self._lock:
            if self._slab is None or not (self._slab[0] <= z0 and z0 + d <= self._slab[1]):
                try:
                    data = np.asarray(
                        self._proxy[..., z0 : z0 + d]
                        if len(self._proxy.shape) == 3
                        else self._proxy[:, :, z0 : z0 + d, ...]
                    )
                except Exception as e:  # noqa: BLE001
                    raise PrepError(f"corrupt or truncated NIfTI: {type(e).__name__}: {e}") from None
                self._slab = (z0, z0 + d, data)
            s0, _, slab = self._slab
        region = slab[x0 : x0 + w, y0 : y0 + h, z0 - s0 : z0 - s0 + d]  # (w, h, d[, C, ...])
        region = region.reshape(w, h, d, -1)
        return region.transpose(3, 2, 1, 0).astype(self.dtype, copy=False)  # (C, d, h, w)

    def metadata(self) -> dict[str, Any]:
        hdr = self._img.header
        return {
            "nifti_axcodes": list(__import__("nibabel").aff2axcodes(self._img.affine)),
            "nifti_qform_code": int(hdr["qform_code"]),
            "nifti_sform_code": int(hdr["sform_code"]),
        }

    def close(self) -> None:
        self._slab = None
        if hasattr(self._proxy, "_opener") and getattr(self._proxy, "_opener", None) is not None:
            self._proxy._opener.close_if_mine()


# --- numpy -------------------------------------------------------------------------------------------


def _channels_first(array: np.ndarray) -> np.ndarray:
    """An .npy array as `(C, Y, X)` / `(C, Z, Y, X)`: 2D is one channel; 3D with a first (or else last)
    axis of at most 4 is channels-first (or channels-last, e.g. `(Y, X, 3)`); other 3D is a 1-channel
    volume `(Z, Y, X)`; 4D is `(C, Z, Y, X)`."""
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        if array.shape[0] <= 4:
            return array
        if array.shape[2] <= 4:
            return array.transpose(2, 0, 1)
        return array[None]
    if array.ndim == 4:
        return array
    raise PrepError(
        f"unsupported array shape {array.shape}: need (Y, X), (C, Y, X), (Z, Y, X) or (C, Z, Y, X)"
    )


class ArrayReader(ImageReader):
    """An in-memory array `(C, Y, X)` or `(C, Z, Y, X)` (used by `convert_array` and the .npy reader)."""

    name = "array"

    def __init__(
        self,
        array: np.ndarray,
        *,
        spacing: tuple[float, ...] | None = None,
        background: float | None = None,
        vendor: str = "numpy",
    ) -> None:
        if array.ndim not in (3, 4):
            raise ValueError(f"array must be (C, Y, X) or (C, Z, Y, X), got shape {array.shape}")
        if min(array.shape) < 1:
            raise ValueError(f"array has an empty axis: shape {array.shape}")
        self._array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = array.dtype
        if spacing is not None:
            spacing = tuple(float(s) for s in spacing)
            if len(spacing) != self.spatial_dims or min(spacing) <= 0:
                raise ValueError(f"spacing must be {self.spatial_dims} positive numbers, got {spacing}")
        self.spacing = spacing
        if background is None:
            background = (
                255 if (array.dtype == np.uint8 and self.shape[0] == 3 and self.spatial_dims == 2) else 0
            )
        self.background = background
        self.vendor = vendor

    @classmethod
    def accepts(cls, path: Path, head: bytes) -> bool:
        return False

    def _read(self, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
        region = (slice(None), *(slice(s, s + n) for s, n in zip(start, size)))
        return np.asarray(self._array[region])


class NpyReader(ArrayReader):
    """A `.npy` file, memory-mapped (regions are read on demand); axes as in `_channels_first`."""

    name = "npy"

    def __init__(self, path: str | Path) -> None:
        try:
            array = np.load(str(path), mmap_mode="r")
        except Exception as e:  # noqa: BLE001
            raise PrepError(f"corrupt .npy: {type(e).__name__}: {e}") from None
        super().__init__(_channels_first(array), vendor="npy")
        self.path = Path(path)

    @classmethod
    def accepts(cls, path: Path, head: bytes) -> bool:
        return head[:6] == NPY_MAGIC


# --- warnings about a readable file ------------------------------------------------------------------

# readers of slide formats, where a lab expects the file to carry its own pyramid
PYRAMID_READERS = ("openslide", "tifffile")


def pyramid_warning(reader: ImageReader, pyramid_max_size: int) -> str | None:
    """A one-line warning for a 2D slide file without a pyramid (one level larger than
    `pyramid_max_size`): prep builds the lower levels itself, from level 0; None otherwise."""
    if reader.name not in PYRAMID_READERS or reader.spatial_dims != 2 or reader.file_levels() > 1:
        return None
    if max(reader.spatial_shape) <= pyramid_max_size:
        return None
    h, w = reader.spatial_shape
    return (
        f"not pyramidal (one level, {h} x {w} px): the pyramid is built from level 0 here; a pyramidal "
        "file (e.g. vips tiffsave --tile --pyramid) reads its lower levels instead"
    )


# --- choosing a reader -------------------------------------------------------------------------------

# tried in this order; the first that accepts the file's content wins
READERS: dict[str, type[ImageReader]] = {
    "openslide": OpenSlideReader,
    "tifffile": TiffReader,
    "nifti": NiftiReader,
    "npy": NpyReader,
}


def check_input(path: Path) -> bytes:
    """The first 1 KiB of `path`, or a PrepError saying why it is not a readable file."""
    if not path.exists():
        raise PrepError("file not found")
    if path.is_dir():
        raise PrepError("is a directory, not an image file (pass the files inside it)")
    size = path.stat().st_size
    if size == 0:
        raise PrepError("empty file (0 bytes)")
    try:
        with path.open("rb") as f:
            return f.read(1024)
    except OSError as e:
        raise PrepError(f"cannot read: {e.strerror or e}") from None


def detect_reader(path: str | Path) -> str:
    """Name of the backend that reads `path`, judged from its content (not its extension)."""
    path = Path(path)
    head = check_input(path)
    for name, cls in READERS.items():
        if cls.accepts(path, head):
            return name
    raise PrepError(f"unsupported format (not a slide, TIFF, NIfTI or .npy file; starts with {head[:8]!r})")


def open_reader(path: str | Path, name: str | None = None, *, mpp: float | None = None) -> ImageReader:
    """Open `path` with the backend `name` (one of READERS) or the one its content calls for.

    `mpp`: the scan's micrometers per pixel at level 0 (`ips prep --source-mpp`), for files whose
    metadata lack it or state it wrongly: it replaces the file's in `spacing` (rows and columns; a
    volume keeps its file's z spacing, or 1 where it has none), and `mpp_override` says so."""
    path = Path(path)
    if name is None:
        name = detect_reader(path)
    else:
        check_input(path)
        if name not in READERS:
            raise PrepError(f"unknown reader {name!r}; choose from {', '.join(READERS)}")
    try:
        reader = READERS[name](path)
    except PrepError:
        raise
    except Exception as e:  # noqa: BLE001 - a backend failing to open is a property of the file
        raise PrepError(f"{name} cannot open it: {type(e).__name__}: {e}") from None
    if min(reader.shape) < 1:
        reader.close()
        raise PrepError(f"empty image: shape {reader.shape}")
    if mpp is not None:
        set_mpp(reader, mpp)
    return reader


def set_mpp(reader: ImageReader, mpp: float) -> None:
    """Give `reader` the level-0 pixel size `mpp` (micrometers) in rows and columns (see `open_reader`)."""
    if not mpp > 0:
        raise PrepError(f"--source-mpp must be > 0, got {mpp}")
    z = tuple(reader.spacing[:-2]) if reader.spacing is not None else (1.0,) * (reader.spatial_dims - 2)
    file_mpp = list(reader.spacing[-2:]) if reader.spacing is not None else None
    reader.spacing = (*z, float(mpp), float(mpp))
    reader.mpp_override = {"mpp": float(mpp), "file_mpp": file_mpp}
