"""Stores on object storage: `ips prep --out s3://...`, reads, predict, heatmap and embed against
a local S3 server (moto, on 127.0.0.1), compared byte for byte with the same work on local disk.

Also: a batch of neighbouring patches costs a few coalesced range requests, not one per patch; damage
is found on remote stores as locally; a store without its marker is refused; a prep killed in the
middle of a remote write leaves nothing that reads as complete, and a rerun completes it.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from inference_fixtures import BINARY, tiny_cfg, write_checkpoint
from s3_fixtures import S3Server, aws_env, s3_session

from data_prep.convert import PrepOptions, convert_array, prep_file
from data_prep.testing import tissue_image, write_pyramid_tiff
from ips.cli.main import main
from ips.data.store import StoreError, open_store, verify_store
from ips.data.zarr_source import FeatureSource, ZarrPatchSource
from ips.format.store import read_marker
from ips.infer.loop import store_records

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3():
    yield from s3_session()


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("slides")
    return [
        write_pyramid_tiff(folder / f"slide{i}.tif", tissue_image(300, 360, seed=i), levels=1, tile=32)
        for i in range(2)
    ]


@pytest.fixture(scope="module")
def prepped(s3: S3Server, slides, tmp_path_factory) -> tuple[str, Path]:
    """The slides prepped by the CLI to `s3://.../prep` and to a local folder: `(url, folder)`."""
    local = tmp_path_factory.mktemp("local")
    url = s3.url("prep")
    for out in (url, str(local)):
        assert main(["prep", *map(str, slides), "--out", out, "--patch-size", "16", "--threads", "1"]) == 0
    return url, local


def _s3_client(s3: S3Server):
    import boto3

    return boto3.client("s3", endpoint_url=s3.endpoint)


def _keys(s3: S3Server, prefix: str) -> list[str]:
    pages = _s3_client(s3).get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_prep_to_s3_writes_what_a_local_prep_writes(s3, prepped):
    url, local = prepped
    for sid in ("slide0", "slide1"):
        remote_store, local_store = f"{url}/{sid}.zarr", local / f"{sid}.zarr"
        # every chunk/shard object, by size and crc32c, equals the local file
        assert read_marker(remote_store).arrays == read_marker(local_store).arrays
        a, b = ZarrPatchSource(remote_store), ZarrPatchSource(local_store)
        assert np.array_equal(a.coords, b.coords) and len(a) > 50
        idx = np.arange(len(a))
        assert np.array_equal(a.read(idx).numpy(), b.read(idx).numpy())
        assert verify_store(remote_store) == []
        thumb = _s3_client(s3).get_object(Bucket=s3.bucket, Key=f"prep/{sid}.thumbnail.png")["Body"].read()
        assert thumb == (local / f"{sid}.thumbnail.png").read_bytes()


def test_a_store_over_plain_http_reads_the_same(s3, prepped):
    """https:// (here http:// on loopback: the S3 server serves objects to plain GETs) is read-only."""
    import json

    url, local = prepped
    public = {
        "Effect": "Allow",
        "Principal": "*",
        "Action": "s3:*",
        "Resource": f"arn:aws:s3:::{s3.bucket}/prep/*",
    }
    policy = json.dumps({"Version": "2012-10-17", "Statement": [public]})
    _s3_client(s3).put_bucket_policy(Bucket=s3.bucket, Policy=policy)
    http = f"{s3.endpoint}/{s3.bucket}/prep/slide1.zarr"
    a, b = ZarrPatchSource(http), ZarrPatchSource(local / "slide1.zarr")
    idx = np.arange(len(b))
    assert np.array_equal(a.read(idx).numpy(), b.read(idx).numpy())
    with pytest.raises(SystemExit):  # argparse: bad usage, exit 2
        main(["prep", "x.tif", "--out", http])


def test_rerun_skips_and_adds_a_grid_remotely(s3, slides, prepped):
    url, _ = prepped
    opts = PrepOptions(patch_size=16, threads=1)
    assert prep_file(slides[0], url, options=opts).status == "skipped"
    result = prep_file(slides[0], url, options=PrepOptions(patch_size=32, threads=1, grid_name="big"))
    assert (result.status, result.store) == ("grid added", f"{url}/slide0.zarr")
    store = open_store(f"{url}/slide0.zarr")
    assert store.complete_grids == {"default", "big"}
    assert len(store.coords("big")) == result.n_patches


def test_a_batch_of_neighbouring_patches_costs_few_requests(s3, prepped):
    url, _ = prepped
    source = ZarrPatchSource(f"{url}/slide0.zarr", read_threads=1)
    # 16 neighbouring patches (16 px, in 64 px chunks of one 512 px shard)
    first = source.coords[0]
    near = np.flatnonzero(np.all(source.coords // 512 == first // 512, axis=1))[:16]
    assert len(near) == 16
    s3.requests.clear()
    patches = source.read(near)
    shard_gets = s3.requests.gets("/prep/slide0.zarr/0/c/")
    assert len(shard_gets) == 2, shard_gets  # the shard index, then one coalesced range for 16 patches
    assert all(r[2].startswith("bytes=") for r in shard_gets)
    s3.requests.clear()
    assert np.array_equal(source.read(near).numpy(), patches.numpy())
    assert len(s3.requests.gets("/0/c/")) == 1  # the index is cached


def test_remote_damage_is_found(s3, slides, tmp_path):
    url = s3.url("damage")
    assert prep_file(slides[0], url, options=PrepOptions(patch_size=16, threads=1)).status == "done"
    client, store = _s3_client(s3), f"{url}/slide0.zarr"
    key = "damage/slide0.zarr/grids/default/coords/c/0/0"
    data = bytearray(client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the crc32c tells
    client.put_object(Bucket=s3.bucket, Key=key, Body=bytes(data))
    with pytest.raises(
        StoreError, match=r"damage/slide0.zarr: array 'grids/default/coords' chunk 'c/0/0': .*damaged"
    ):
        ZarrPatchSource(store)
    assert len(verify_store(store)) == 1 and "damaged" in verify_store(store)[0]
    client.delete_object(Bucket=s3.bucket, Key="damage/slide0.zarr/0/c/0/0/0")
    with pytest.raises(StoreError, match=r"array '0' chunk 'c/0/0/0': missing"):
        open_store(store)


def test_a_store_without_its_marker_is_incomplete_until_a_rerun(s3, slides):
    url = s3.url("nomarker")
    opts = PrepOptions(patch_size=16, threads=1)
    assert prep_file(slides[1], url, options=opts).status == "done"
    _s3_client(s3).delete_object(Bucket=s3.bucket, Key="nomarker/slide1.zarr/ips_complete.json")
    with pytest.raises(StoreError, match=r"nomarker/slide1.zarr: incomplete store \(no ips_complete.json\)"):
        open_store(f"{url}/slide1.zarr")
    assert prep_file(slides[1], url, options=opts).status == "done"  # redone, not skipped
    assert len(ZarrPatchSource(f"{url}/slide1.zarr")) > 0
    with pytest.raises(StoreError, match=r"nomarker/nothing.zarr: store does not exist"):
        open_store(f"{url}/nothing.zarr")


def test_a_prep_killed_mid_write_leaves_nothing_complete(s3, tmp_path):
    """kill -9 a prep subprocess once its first level-0 shard is on the server; the store reads as
    incomplete; a rerun completes it."""
    src = write_pyramid_tiff(tmp_path / "big.tif", tissue_image(2048, 2048, seed=3), levels=1, tile=256)
    url = s3.url("killed")
    env = {**os.environ, **aws_env(s3.endpoint), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "ips.cli", "prep", str(src), "--out", url, "--patch-size", "16"]
    s3.requests.clear()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while not any(r[0] == "PUT" and "/killed/big.zarr/0/c/" in r[1] for r in list(s3.requests.log)):
            assert proc.poll() is None and time.monotonic() < deadline, "the prep ended before writing"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    keys = _keys(s3, "killed/big.zarr/")
    assert "killed/big.zarr/zarr.json" in keys and "killed/big.zarr/ips_complete.json" not in keys
    with pytest.raises(StoreError, match=r"killed/big.zarr: incomplete store"):
        open_store(f"{url}/big.zarr")
    assert prep_file(src, url, options=PrepOptions(patch_size=16, threads=1)).status == "done"
    assert open_store(f"{url}/big.zarr").grid().n_patches > 0


@pytest.fixture(scope="module")
def model_stores(s3, tmp_path_factory):
    """The same two tiny stores on disk and on S3, and an untrained checkpoint."""
    root = tmp_path_factory.mktemp("model")
    rng = np.random.default_rng(0)
    opts = PrepOptions(patch_size=16, min_tissue=0.0, thumbnail=False, hash_source=False, threads=1)
    for i in range(2):
        img = rng.integers(0, 255, (3, 64, 48), dtype=np.uint8)
        for out in (root / "stores", s3.url("model")):
            convert_array(img, out, f"s{i}", options=opts, mask=np.ones((64, 48), bool))
    cfg = tiny_cfg(tasks=[BINARY], memory_size=3, iter_size=5)
    return root, write_checkpoint(root / "model.pt", cfg), s3.url("model")


def test_predict_and_heatmap_read_s3_stores(model_stores, tmp_path):
    root, ckpt, url = model_stores
    outs = {}
    for where, base in (("local", str(root / "stores")), ("s3", url)):
        manifest = tmp_path / f"{where}.csv"
        with manifest.open("w", newline="") as f:
            csv.writer(f).writerows(
                [["slide_id", "path", "a"], ["s0", f"{base}/s0.zarr", 1], ["s1", f"{base}/s1.zarr", 0]]
            )
        out = tmp_path / where
        assert (
            main(
                [
                    "predict",
                    "--checkpoint",
                    str(ckpt),
                    "--manifest",
                    str(manifest),
                    "--out",
                    str(out),
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        outs[where] = (out / "predictions.csv").read_text()
        assert (
            main(
                [
                    "heatmap",
                    "--checkpoint",
                    str(ckpt),
                    f"{base}/s1.zarr",
                    "--out",
                    str(tmp_path / f"h{where}"),
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
    assert outs["s3"] == outs["local"]
    assert (tmp_path / "hs3" / "s1" / "heatmap.geojson").read_text() == (
        tmp_path / "hlocal" / "s1" / "heatmap.geojson"
    ).read_text()
    assert [r.path for r in store_records([f"{url}/s0.zarr"])] == [f"{url}/s0.zarr"]


def test_embed_writes_features_into_s3_stores(model_stores):
    root, _, url = model_stores
    import torch

    for store in (str(root / "stores" / "s0.zarr"), f"{url}/s0.zarr"):
        torch.manual_seed(0)  # the same untrained encoder for both
        assert (
            main(["embed", store, "--encoder", "ips_cnn_tiny", "--device", "cpu", "--chunk-size", "5"]) == 0
        )
    local, remote = FeatureSource(root / "stores" / "s0.zarr"), FeatureSource(f"{url}/s0.zarr")
    idx = np.arange(len(local))
    assert np.array_equal(local.read(idx).numpy(), remote.read(idx).numpy())


def test_lossy_codec_and_store_from_grid_on_s3_equal_local(s3, tmp_path):
    """The two other issue-16 options go through the remote writer too: a JPEG-coded store that begins
    at the grid's level (source level 1) is the same object for object on S3 as on disk."""
    slide = write_pyramid_tiff(tmp_path / "two.tif", tissue_image(320, 384, seed=5), levels=2, tile=32)
    url, local = s3.url("lossy"), tmp_path / "local"
    opts = ["--patch-size", "16", "--level", "1", "--store-from", "grid", "--codec", "jpeg", "--threads", "1"]
    for out in (url, str(local)):
        assert main(["prep", str(slide), "--out", out, *opts]) == 0
    remote_store, local_store = f"{url}/two.zarr", local / "two.zarr"
    assert read_marker(remote_store).arrays == read_marker(local_store).arrays
    a, b = open_store(remote_store), open_store(local_store)
    assert (
        a.attrs["source_level"] == b.attrs["source_level"] and b.attrs["source_level"]["pyramid_level"] == 1
    )
    sa, sb = ZarrPatchSource(remote_store), ZarrPatchSource(local_store)
    idx = np.arange(len(sb))
    assert len(sb) > 20 and np.array_equal(sa.read(idx).numpy(), sb.read(idx).numpy())
    # grid in store (source level 1) pixels; level-0 coordinates twice them
    assert np.array_equal(sa.level0_coords(), sb.level0_coords())
    assert np.array_equal(sb.level0_coords(), sb.coords * 2)
    assert verify_store(remote_store) == []
