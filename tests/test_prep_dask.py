"""`ips prep --dask local:2`: 8 slides on a local Dask cluster of 2 worker processes give the
stores a serial prep gives, byte for byte, except the two timestamps (`ips.provenance.created` in the
root `zarr.json`, `completed` in the marker); a bad input fails alone, named in the summary."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from data_prep.dask_run import parse_dask
from data_prep.testing import tissue_image, write_pyramid_tiff
from ips.cli.main import main
from ips.errors import ConfigError

TIMESTAMP = re.compile(rb'"(created|completed)": ?"[^"]*"')


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes), timestamps masked."""
    return {
        str(p.relative_to(root)): TIMESTAMP.sub(rb'"\1": "-"', p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_dask_prep_equals_serial_prep(tmp_path, capsys):
    pytest.importorskip("distributed", reason="--dask needs dask.distributed (pip install -e '.[test]')")
    slides = [
        str(write_pyramid_tiff(tmp_path / f"s{i}.tif", tissue_image(200, 240, seed=i), levels=1, tile=32))
        for i in range(8)
    ]
    bad = tmp_path / "empty.tif"
    bad.write_bytes(b"")
    common = ["--patch-size", "16", "--threads", "1"]  # the thread count is recorded in provenance
    assert main(["prep", *slides, "--out", str(tmp_path / "serial"), *common]) == 0
    capsys.readouterr()
    out = tmp_path / "dask"
    assert main(["prep", *slides, str(bad), "--out", str(out), *common, "--dask", "local:2"]) == 1
    said = capsys.readouterr()
    assert said.out.endswith("8 done, 1 failed\n")
    assert re.search(r"^empty +failed .*empty file", said.out, re.M) and f"FAILED {bad}: " in said.err
    serial, parallel = tree(tmp_path / "serial"), tree(out)
    assert len(serial) == 8 * 13  # 8 stores, 12 files each, and a thumbnail beside each
    assert serial == parallel


def test_parse_dask():
    assert parse_dask("local:3") == (None, 3)
    assert parse_dask("tcp://10.0.0.1:8786") == ("tcp://10.0.0.1:8786", 0)
    with pytest.raises(ConfigError, match="local:N"):
        parse_dask("local:zero")
