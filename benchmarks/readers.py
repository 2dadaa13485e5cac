#!/usr/bin/env python
"""Per reader: a fixture made offline from the shared real SVS, what `ips prep` read from it, and how
far the store's level 0 is from the pixels the fixture holds.

    IPS_TEST_DATA=../shared/data python benchmarks/readers.py --out /tmp/readers --json readers.json

Needs the test extra (pytest, pydicom: the fixture writers of `data_prep.testing`).

Fixtures (all from `cmu_small_region.svs`, 2220 x 2967 px, 0.499 um/px, one level):
- `svs`: the file itself (OpenSlide, vendor aperio; not pyramidal: prep warns and builds the pyramid);
- `dicom`: its pixels as DICOM-WSI, 3 levels of 240 px uncompressed frames (`write_dicom_wsi`);
- `ndpi`: its pixels as Hamamatsu NDPI, 3 JPEG levels (`write_ndpi`); truth = the JPEG's decode;
- `tiff-no-mpp`: its pixels as a pyramidal TIFF without resolution tags, prepped with `--source-mpp 0.499`;
- `tiff-flat`: its pixels as a one-level tiled TIFF (prep warns and builds the pyramid).
Each is prepped with `--patch-size 224 --mpp 1.0 --codec blosc-lz4` (lossless).

Results page row: docs/BENCHMARKS.md, "Readers".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import zarr

from data_prep.readers import open_reader
from data_prep.testing import write_dicom_wsi, write_ndpi, write_pyramid_tiff
from ips.cli.main import main as ips_main


def fixtures(svs: Path, out: Path) -> dict[str, tuple[Path, np.ndarray, list[str]]]:
    """name -> (file, the level-0 pixels it holds (Y, X, 3), extra prep flags)."""
    pixels = tifffile.imread(svs)
    _, ndpi_truth = write_ndpi(out / "cmu.ndpi", pixels, levels=3, mpp=0.499)
    flat = out / "cmu_flat.tif"
    tifffile.imwrite(
        flat, pixels, tile=(256, 256), photometric="rgb", compression="zlib",
        resolution=(1e4 / 0.499, 1e4 / 0.499), resolutionunit="CENTIMETER",
    )  # fmt: skip
    return {
        "svs": (svs, pixels, []),
        "dicom": (
            write_dicom_wsi(out / "dicom", pixels, levels=3, tile=240, mpp=0.499, name="cmu"),
            pixels,
            [],
        ),
        "ndpi": (out / "cmu.ndpi", ndpi_truth, []),
        "tiff-no-mpp": (
            write_pyramid_tiff(out / "cmu_nompp.tif", pixels, levels=3, tile=256, mpp=None),
            pixels,
            ["--source-mpp", "0.499"],
        ),
        "tiff-flat": (flat, pixels, []),
    }


def prep_one(name: str, path: Path, truth: np.ndarray, flags: list[str], out: Path) -> dict:
    with open_reader(path) as r:
        info = {
            "file": path.name,
            "reader": r.name,
            "vendor": r.vendor,
            "shape": list(r.shape),
            "file_mpp": [round(s, 4) for s in r.spacing] if r.spacing else None,
            "file_levels": r.file_levels(),
        }
    store_dir = out / f"stores_{name}"
    argv = ["prep", str(path), "--out", str(store_dir), "--patch-size", "224", "--mpp", "1.0"]
    argv += ["--codec", "blosc-lz4", "--quiet", "--no-thumbnail", *flags]
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = ips_main(argv)
    seconds = time.perf_counter() - t0
    store = next(store_dir.glob("*.zarr"))
    g = zarr.open_group(str(store), mode="r")
    attrs = g.attrs["ips"]
    level0 = np.asarray(g["0"][...]).transpose(1, 2, 0)
    return {
        **info,
        "flags": " ".join(flags),
        "exit": status,
        "warnings": [line for line in err.getvalue().splitlines() if "warning" in line],
        "store_mpp": attrs["spacing"],
        "grid_level": attrs["grids"]["default"]["level"],
        "store_levels": len(attrs["level_downsamples"]),
        "patches": int(g["grids/default/coords"].shape[0]),
        "max_abs_diff_level0": int(np.abs(level0.astype(np.int16) - truth).max()),
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--json")
    args = p.parse_args(argv)
    root = os.environ.get("IPS_TEST_DATA")
    if not root:
        print("set IPS_TEST_DATA to the shared data folder", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, (path, truth, flags) in fixtures(Path(root) / "cmu_small_region.svs", out).items():
        rows[name] = prep_one(name, path, truth, flags, out)
        print(name, json.dumps(rows[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
