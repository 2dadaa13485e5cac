"""`embed_store` / `ips embed`: features equal the encoder's output, written chunk by chunk, resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loader_fixtures import random_image, write_store
from torch import nn

from ips.cli.main import main
from ips.data.store import StoreError, open_store
from ips.data.zarr_source import FeatureSource, ZarrPatchSource
from ips.infer.embed import PROGRESS_ATTR, embed_store


class TinyEncoder(nn.Module):
    """`(n, C, H, W)` -> `(n, 6)`; records the batch sizes it saw and can fail at a given call."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3)
        self.calls: list[int] = []
        self.fail_at = fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        if self.fail_at is not None and len(self.calls) > self.fail_at:
            raise KeyboardInterrupt("killed")
        return self.conv(x).mean(dim=(2, 3))


@pytest.fixture
def store(tmp_path):
    return write_store(tmp_path / "s.zarr", random_image((3, 40, 56)), patch_size=8)  # 35 patches


def _reference(store, encoder) -> np.ndarray:
    source = ZarrPatchSource(store)
    x = source.read(np.arange(len(source))).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        return encoder((x - mean) / std).numpy()


def test_features_equal_encoder_output(store):
    enc = TinyEncoder()
    info = embed_store(store, enc, chunk_size=8, dtype="float32")
    assert info.dim == 6 and info.grid == "default"
    feats = FeatureSource(store)
    assert len(feats) == 35 and feats.patch_shape == (6,)
    np.testing.assert_allclose(feats.read(np.arange(35)).numpy(), _reference(store, TinyEncoder()), atol=1e-5)
    np.testing.assert_array_equal(feats.positions(), ZarrPatchSource(store).positions())
    assert max(enc.calls) <= 8  # chunk by chunk: never all 35 at once
    assert enc.training  # the encoder's mode is restored


def test_float16_default(store):
    embed_store(store, TinyEncoder(), chunk_size=16)
    arr = open_store(store).embeddings("default")
    assert arr.dtype == np.float16 and arr.chunks == (16, 6)
    np.testing.assert_allclose(
        FeatureSource(store).read(np.arange(35)).numpy(), _reference(store, TinyEncoder()), atol=2e-3
    )


def test_interrupted_run_resumes(store):
    with pytest.raises(KeyboardInterrupt):
        embed_store(
            store, TinyEncoder(fail_at=3), chunk_size=8, dtype="float32"
        )  # probe + 2 chunks, then dies
    s = open_store(store)
    assert "default" not in s.features  # not announced: FeatureSource refuses a half-written set
    with pytest.raises(StoreError, match="unknown feature set"):
        FeatureSource(store)
    assert s.group["features/default/embeddings"].attrs[PROGRESS_ATTR]["done"] == 16
    enc = TinyEncoder()
    embed_store(store, enc, chunk_size=8, dtype="float32", encoder_name="TinyEncoder")
    assert enc.calls == [1, 8, 8, 3]  # the probe, then only the rows not done
    np.testing.assert_allclose(
        FeatureSource(store).read(np.arange(35)).numpy(), _reference(store, TinyEncoder()), atol=1e-5
    )


def test_complete_set_is_kept_unless_overwrite(store):
    embed_store(store, TinyEncoder(), chunk_size=8)
    enc = TinyEncoder()
    embed_store(store, enc, chunk_size=8)
    assert enc.calls == []
    embed_store(store, enc, chunk_size=8, overwrite=True)
    assert sum(enc.calls) == 1 + 35


def test_different_encoder_restarts(store):
    with pytest.raises(KeyboardInterrupt):
        embed_store(store, TinyEncoder(fail_at=2), chunk_size=8, encoder_name="a")
    enc = TinyEncoder()
    embed_store(store, enc, chunk_size=8, encoder_name="b")
    assert sum(enc.calls) == 1 + 35
    assert open_store(store).feature("default").encoder == "b"


def test_bad_arguments(store):
    with pytest.raises(ValueError, match="chunk_size"):
        embed_store(store, TinyEncoder(), chunk_size=0)
    with pytest.raises(ValueError, match="dtype"):
        embed_store(store, TinyEncoder(), dtype="int8")
    with pytest.raises(StoreError, match="unknown grid"):
        embed_store(store, TinyEncoder(), grid="nope")


def test_cli(store, tmp_path, capsys):
    assert (
        main(["embed", str(store), "--encoder", "ips_cnn_tiny", "--chunk-size", "16", "--name", "tiny"]) == 0
    )
    feats = FeatureSource(store, "tiny")
    assert len(feats) == 35 and torch.isfinite(feats.read(np.arange(35))).all()
    assert main(["embed", str(store), str(tmp_path / "gone.zarr"), "--encoder", "ips_cnn_tiny"]) == 1
    assert "gone.zarr" in capsys.readouterr().err
    assert main(["embed", str(store), "--encoder", "no_such_encoder_xyz"]) == 2


def test_cli_shards_split_the_stores_without_overlap(tmp_path, capsys):
    """`ips embed --shard i/n` (one job-array task each): the shards together embed every store once,
    whatever order each task got them in, and the features equal an unsharded run's."""
    stores = [
        str(write_store(tmp_path / f"s{i}.zarr", random_image((3, 24, 24), seed=i), patch_size=8))
        for i in range(5)
    ]
    args = ["--encoder", "ips_cnn_tiny", "--device", "cpu", "--chunk-size", "16", "--dtype", "float32"]
    done = []
    for i, order in enumerate((stores, stores[::-1])):
        capsys.readouterr()
        assert main(["embed", *order, *args, "--name", "part", "--shard", f"{i}/2"]) == 0
        done += [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert sorted(done) == sorted(stores)  # each store once
    assert main(["embed", *stores, *args, "--name", "whole"]) == 0
    for s in stores:
        whole, part = FeatureSource(s, "whole"), FeatureSource(s, "part")
        assert torch.equal(whole.read(np.arange(len(whole))), part.read(np.arange(len(part))))
    with pytest.raises(SystemExit):  # argparse: i must be < n
        main(["embed", *stores, *args, "--shard", "2/2"])
