"""Test support: the reader contract every backend's tests subclass, and tiny generated fixtures.

Like zarr's `zarr.testing.store.StoreTests`: a backend's test class subclasses `ReaderTests` and
implements `open(tmp_path) -> (reader, expected)`; every contract test then runs against it. Needs
pytest (a test dependency), so only tests import this module.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from data_prep.readers import ImageReader, detect_reader


class ReaderTests:
    """The contract of `ImageReader`. Subclasses set `expected_spacing` (or None) and `detected_as`
    (the name `detect_reader` must give the file, or None for in-memory / forced backends)."""

    expected_spacing: tuple[float, ...] | None = None
    detected_as: str | None = None

    def open(self, tmp_path: Path) -> tuple[ImageReader, np.ndarray]:
        """Write a fixture under `tmp_path`, open it: `(reader, expected pixels (C, *spatial))`."""
        raise NotImplementedError

    @pytest.fixture
    def case(self, tmp_path: Path):
        reader, expected = self.open(tmp_path)
        yield reader, expected
        reader.close()

    def test_shape_and_dtype(self, case) -> None:
        reader, expected = case
        assert reader.shape == expected.shape
        assert reader.dtype == expected.dtype
        assert reader.spatial_dims == expected.ndim - 1
        assert reader.spatial_shape == expected.shape[1:]

    def test_whole_image(self, case) -> None:
        reader, expected = case
        np.testing.assert_array_equal(
            reader.read_region((0,) * reader.spatial_dims, reader.spatial_shape), expected
        )

    def test_regions(self, case) -> None:
        reader, expected = case
        rng = np.random.default_rng(0)
        spatial = reader.spatial_shape
        regions = [
            ((0,) * len(spatial), (1,) * len(spatial)),  # one pixel
            (tuple(n - 1 for n in spatial), (1,) * len(spatial)),  # the last pixel
            (tuple(n // 3 for n in spatial), tuple(n - n // 3 for n in spatial)),
        ]  # to the far edge
        for _ in range(8):  # unaligned regions
            start = tuple(int(rng.integers(0, n)) for n in spatial)
            size = tuple(int(rng.integers(1, n - s + 1)) for s, n in zip(start, spatial))
            regions.append((start, size))
        for start, size in regions:
            got = reader.read_region(start, size)
            want = expected[(slice(None), *(slice(s, s + n) for s, n in zip(start, size)))]
            assert got.shape == want.shape, (start, size)
            np.testing.assert_array_equal(got, want, err_msg=f"region {start}+{size}")

    def test_out_of_bounds(self, case) -> None:
        reader, _ = case
        dims = reader.spatial_dims
        with pytest.raises(ValueError, match="outside"):
            reader.read_region((0,) * dims, tuple(n + 1 for n in reader.spatial_shape))
        with pytest.raises(ValueError, match="outside"):
            reader.read_region((-1,) + (0,) * (dims - 1), (1,) * dims)
        with pytest.raises(ValueError, match="needs"):
            reader.read_region((0,) * (dims + 1), (1,) * (dims + 1))

    def test_spacing(self, case) -> None:
        reader, _ = case
        if self.expected_spacing is None:
            assert reader.spacing is None
        else:
            assert reader.spacing is not None
            np.testing.assert_allclose(reader.spacing, self.expected_spacing, rtol=1e-5)

    def test_parallel_reads(self, case) -> None:
        """The writer reads regions from several threads at once."""
        reader, expected = case
        spatial = reader.spatial_shape
        step = tuple(max(1, n // 3) for n in spatial)
        starts = list(np.ndindex(*(len(range(0, n, s)) for n, s in zip(spatial, step))))
        regions = [(tuple(i * s for i, s in zip(idx, step)),) for idx in starts]
        regions = [(st, tuple(min(s, n - o) for s, n, o in zip(step, spatial, st))) for (st,) in regions] * 3

        def read(region):
            return reader.read_region(*region)

        with ThreadPoolExecutor(4) as pool:
            for (start, size), got in zip(regions, pool.map(read, regions)):
                want = expected[(slice(None), *(slice(s, s + n) for s, n in zip(start, size)))]
                np.testing.assert_array_equal(got, want)

    def test_detected(self, case) -> None:
        reader, _ = case
        if self.detected_as is not None:
            assert reader.path is not None
            assert detect_reader(reader.path) == self.detected_as

    def test_metadata_is_json(self, case) -> None:
        import json

        reader, _ = case
        json.dumps(reader.metadata())
        assert isinstance(reader.vendor, str) and reader.vendor


# --- generated fixtures ------------------------------------------------------------------------------


def tissue_image(
    height: int, width: int, *, seed: int = 0, box: tuple[float, float, float, float] = (0.2, 0.2, 0.8, 0.7)
) -> np.ndarray:
    """A brightfield-like RGB image: white glass (255) with a stained (pink/purple, textured) rectangle
    covering the fractional box `(y0, x0, y1, x1)`. Returns uint8 `(Y, X, 3)`."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 255, np.uint8)
    y0, x0, y1, x1 = int(box[0] * height), int(box[1] * width), int(box[2] * height), int(box[3] * width)
    h, w = y1 - y0, x1 - x0
    base = np.array([180, 90, 170], np.int16)
    noise = rng.integers(-40, 40, (h, w, 3), dtype=np.int16)
    img[y0:y1, x0:x1] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return img


def texture_image(height: int, width: int, *, seed: int = 0, cell: int = 8) -> np.ndarray:
    """A smooth, stained-looking RGB texture (no glass): random colours on a `cell`-pixel lattice,
    bilinearly interpolated, plus +-2 grey levels of noise, like the low-frequency content of H&E at
    20x. For lossy-codec tests without the real slide. Returns uint8 `(Y, X, 3)`."""
    rng = np.random.default_rng(seed)
    lattice = rng.uniform(-1, 1, (height // cell + 2, width // cell + 2, 3))
    ys, xs = np.arange(height) / cell, np.arange(width) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    ty, tx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    smooth = (
        lattice[y0][:, x0] * (1 - ty) * (1 - tx)
        + lattice[y0 + 1][:, x0] * ty * (1 - tx)
        + lattice[y0][:, x0 + 1] * (1 - ty) * tx
        + lattice[y0 + 1][:, x0 + 1] * ty * tx
    )
    base = np.array([185.0, 110.0, 175.0])  # eosin pink; the texture swings +-60 around it
    img = base + 60 * smooth + rng.integers(-2, 3, (height, width, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_pyramid_tiff(
    path: str | Path,
    image: np.ndarray,
    *,
    levels: int = 3,
    tile: int = 64,
    compression: str | None = "zlib",
    mpp: float | None = 0.5,
) -> Path:
    """A tiled pyramidal TIFF (level 0 plus `levels - 1` SubIFDs, each half the previous), RGB or grey.

    `image`: `(Y, X, 3)` or `(Y, X)`. `mpp`: micrometers per pixel written as resolution tags.
    """
    import tifffile

    path = Path(path)
    kwargs = {}
    if mpp is not None:
        kwargs = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    photometric = "rgb" if image.ndim == 3 else "minisblack"
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            image,
            tile=(tile, tile),
            compression=compression,
            photometric=photometric,
            subifds=levels - 1,
            **kwargs,
        )
        level = image
        for _ in range(levels - 1):
            level = level[::2, ::2]
            tif.write(
                level, tile=(tile, tile), compression=compression, photometric=photometric, subfiletype=1
            )
    return path


def write_nifti(path: str | Path, volume: np.ndarray, affine: np.ndarray) -> Path:
    """A NIfTI-1 file of `volume` `(I, J, K)` (nibabel's order) with `affine`, units mm."""
    import nibabel as nib

    img = nib.Nifti1Image(volume, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return Path(path)


# --- a test oracle: the share of each patch inside a mask, by plain block sums -----------------------
# (the project computes it one way, `data_prep.grid.tissue_fractions` through `ips.synthetic.grid_share`;
# tests compare that with these independent sums)


def patch_fraction(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """Fraction of each `patch_size` grid cell inside `mask`: `(ceil(H/p), ceil(W/p))` (or 3D) float32.

    Edge cells that stick out of the image count only their pixels inside it.
    """
    p = patch_size
    cells = tuple(-(-s // p) for s in mask.shape)
    padded = np.zeros(tuple(c * p for c in cells), dtype=np.float32)
    padded[tuple(slice(0, s) for s in mask.shape)] = mask
    inside = np.zeros_like(padded)
    inside[tuple(slice(0, s) for s in mask.shape)] = 1.0
    # (G0, p, G1, p, ...) -> sum over the within-cell axes
    split = tuple(x for c in cells for x in (c, p))
    axes = tuple(range(1, 2 * len(cells), 2))
    return (padded.reshape(split).sum(axes) / inside.reshape(split).sum(axes)).astype(np.float32)


def cells_to_grid(cells: np.ndarray, coords: np.ndarray, patch_size: int) -> np.ndarray:
    """Per-cell values `(G0, G1[, G2])` of a stride-`patch_size` grid -> per-patch `(N,)` at `coords (N, d)`."""
    return cells[tuple((coords // patch_size).T)]


def write_dicom_wsi(
    folder: str | Path,
    image: np.ndarray,
    *,
    levels: int = 2,
    tile: int = 64,
    mpp: float | None = 0.5,
    name: str = "slide",
) -> Path:
    """A DICOM whole-slide image (VL Whole Slide Microscopy, one file per pyramid level, uncompressed
    RGB frames in TILED_FULL order, so pixels round-trip exactly) in `folder`; returns level 0's file.

    `image`: `(Y, X, 3)` uint8. Level k is `image[::2**k, ::2**k]`. `mpp`: written as the pixel spacing
    (mm) of the shared functional groups, where OpenSlide reads it; None leaves it out."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    wsi_class = "1.2.840.10008.5.1.4.1.1.77.1.6"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    first = None
    for k in range(levels):
        level = np.ascontiguousarray(image[:: 2**k, :: 2**k])
        h, w = level.shape[:2]
        rows, cols = -(-h // tile), -(-w // tile)
        padded = np.zeros((rows * tile, cols * tile, 3), np.uint8)
        padded[:h, :w] = level
        # frames row by row (TILED_FULL), each a (tile, tile, 3) block
        frames = padded.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = wsi_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = wsi_class, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Modality, ds.PatientID, ds.InstanceNumber = "SM", "fixture", k + 1
        ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE" if k == 0 else "RESAMPLED"]
        ds.Rows = ds.Columns = tile
        ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = h, w
        ds.TotalPixelMatrixFocalPlanes = ds.NumberOfFocalPlanes = ds.NumberOfOpticalPaths = 1
        ds.NumberOfFrames = rows * cols
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        if mpp is not None:
            measures = Dataset()
            measures.PixelSpacing = [mpp * 2**k / 1000.0] * 2  # mm, (row, column)
            measures.SliceThickness = 0.001
            shared = Dataset()
            shared.PixelMeasuresSequence = Sequence([measures])
            ds.SharedFunctionalGroupsSequence = Sequence([shared])
        ds.PixelData = frames.tobytes()
        path = folder / f"{name}_level{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        first = first or path
    assert first is not None
    return first


def write_ndpi(
    path: str | Path, image: np.ndarray, *, levels: int = 2, mpp: float = 0.5, quality: int = 95
) -> tuple[Path, np.ndarray]:
    """A Hamamatsu NDPI file: a TIFF whose pages each hold one level as a single JPEG strip (no restart
    markers: OpenSlide reads each level as one tile), tagged with the NDPI format flag, the source lens
    and focal plane 0. Returns `(path, level 0 as its JPEG decodes)`: the pixels a reader must give.

    `image`: `(Y, X, 3)` uint8; level k is `image[::2**k, ::2**k]`, at `mpp * 2**k` um/px."""
    import io

    import tifffile
    from PIL import Image

    def encode(level: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(level).save(buf, format="JPEG", quality=quality, subsampling=0)
        return buf.getvalue()

    path = Path(path)
    first = b""
    with tifffile.TiffWriter(path) as tif:
        for k in range(levels):
            level = np.ascontiguousarray(image[:: 2**k, :: 2**k])
            data = encode(level)
            first = first or data
            px_per_cm = 1e4 / (mpp * 2**k)
            tif.write(
                iter([data]),
                shape=level.shape,
                dtype=np.uint8,
                compression="jpeg",
                photometric="rgb",
                rowsperstrip=level.shape[0],
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                # NDPI tags: format flag, source lens (magnification; > 0 marks a pyramid level), focal plane
                extratags=[
                    (65420, "I", 1, 1, True),
                    (65421, "f", 1, 20.0 / 2**k, True),
                    (65424, "i", 1, 0, True),
                ],
                contiguous=False,
            )
    return path, np.asarray(Image.open(io.BytesIO(first)).convert("RGB"))
