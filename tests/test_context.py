"""Context reads (`data.context`): each cell's patch plus the area average of the window centred on it.

The oracle is independent of the reader: the whole image, padded with the store's background by
`np.pad`, sliced at the cell's centre, averaged per block with float arithmetic and rounded half up.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ips.config import DataConfig, ExperimentConfig, ModelConfig
from ips.data.context import ContextSource, area_downsample
from ips.data.manifest import SlideRecord
from ips.data.open import SourceFactory
from ips.data.zarr_source import ZarrPatchSource
from ips.errors import ConfigError
from ips.model.ips_model import build_model
from tests.loader_fixtures import grid_coords, random_image, write_store


def oracle_context(image: np.ndarray, corner: np.ndarray, patch: int, k: int, background: int) -> np.ndarray:
    """The context view of the cell at `corner` of `image` `(C, *S)`: `(C, *[patch] * dims)`."""
    dims = image.ndim - 1
    pad = k * patch  # more than any window reaches outside the image
    padded = np.pad(image, [(0, 0)] + [(pad, pad)] * dims, constant_values=background)
    centre2 = 2 * np.asarray(corner) + patch  # twice the cell's centre (integer for odd sizes too)
    lo = (centre2 - k * patch) // 2 + pad
    window = padded[(slice(None), *(slice(int(a), int(a) + k * patch) for a in lo))].astype(np.float64)
    out = np.empty((image.shape[0], *([patch] * dims)))
    for block in np.ndindex(*([patch] * dims)):
        sel = (slice(None), *(slice(b * k, (b + 1) * k) for b in block))
        out[(slice(None), *block)] = window[sel].reshape(image.shape[0], -1).mean(axis=1)
    return np.floor(out + 0.5).astype(image.dtype)


def _store_2d(tmp_path, background=255):
    image = random_image((3, 40, 56), seed=3)
    coords = grid_coords((40, 56), (8, 8), (8, 8))  # 5 x 7 cells: corners, edges, inside
    path = write_store(tmp_path / "s.zarr", image, patch_size=8, coords=coords, background=background)
    return image, coords, path


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("direct", [True, False])
def test_context_equals_oracle_2d(tmp_path, k, direct):
    image, coords, path = _store_2d(tmp_path)
    base = ZarrPatchSource(path, read_threads=2, direct_chunks=direct)
    src = ContextSource(base, k)
    order = np.random.default_rng(k).permutation(len(coords))  # any order, corners and edges included
    got = src.read(order).numpy()
    assert got.shape == (len(order), 6, 8, 8) and got.dtype == np.uint8
    for j, i in enumerate(order):
        y, x = coords[i]
        np.testing.assert_array_equal(got[j, :3], image[:, y : y + 8, x : x + 8])  # the patch, unchanged
        np.testing.assert_array_equal(got[j, 3:], oracle_context(image, coords[i], 8, k, 255), err_msg=f"{i}")
    # positions and coords are the cell's own
    np.testing.assert_array_equal(src.positions(), base.positions())
    np.testing.assert_array_equal(src.coords, coords)


def test_context_padding_uses_store_background(tmp_path):
    image, coords, path = _store_2d(tmp_path, background=7)
    src = ContextSource(ZarrPatchSource(path), 3)
    corner = 0  # the (0, 0) cell: its window's top-left 8 x 8 block is wholly outside the image
    got = src.read_context(np.array([corner]))[0]
    assert np.all(got[:, 0, 0] == 7)
    np.testing.assert_array_equal(got, oracle_context(image, coords[corner], 8, 3, 7))
    # an oracle that padded with another value differs: the check can fail
    assert not np.array_equal(got, oracle_context(image, coords[corner], 8, 3, 255))


def test_context_equals_oracle_3d(tmp_path):
    image = random_image((1, 12, 20, 16), seed=5)
    coords = grid_coords((12, 20, 16), (4, 4, 4), (4, 4, 4))
    path = write_store(tmp_path / "v.zarr", image, patch_size=4, coords=coords, background=0)
    src = ContextSource(ZarrPatchSource(path), 3)
    idx = np.arange(len(coords))
    got = src.read(idx).numpy()
    assert got.shape == (len(coords), 2, 4, 4, 4)
    for i in idx:
        z, y, x = coords[i]
        np.testing.assert_array_equal(got[i, :1], image[:, z : z + 4, y : y + 4, x : x + 4])
        np.testing.assert_array_equal(got[i, 1:], oracle_context(image, coords[i], 4, 3, 0))


def test_context_reads_in_bounded_steps(tmp_path, monkeypatch):
    """However many cells are asked for, at most WINDOW_PIXELS window pixels are decoded per step."""
    import ips.data.context as context

    image, coords, path = _store_2d(tmp_path)
    monkeypatch.setattr(context, "WINDOW_PIXELS", 3 * 24 * 24 * 4)  # four 3 x 24 x 24 windows per step
    base = ZarrPatchSource(path)
    sizes = []
    read_boxes = base.read_boxes
    monkeypatch.setattr(base, "read_boxes", lambda lo, size: sizes.append(len(lo)) or read_boxes(lo, size))
    src = context.ContextSource(base, 3)
    order = np.random.default_rng(1).permutation(len(coords))
    got = src.read_context(order)
    assert max(sizes) == 4 and sum(sizes) == len(coords)
    for j, i in enumerate(order):
        np.testing.assert_array_equal(got[j], oracle_context(image, coords[i], 8, 3, 255))


def test_area_downsample_rounds_half_up():
    x = np.array([[[[0, 1], [0, 1]]]], dtype=np.uint8)  # mean 0.5 -> 1
    assert area_downsample(x, 2).tolist() == [[[[1]]]]
    x = np.array([[[[0, 1], [0, 0]]]], dtype=np.uint8)  # mean 0.25 -> 0
    assert area_downsample(x, 2).tolist() == [[[[0]]]]
    f = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)
    assert area_downsample(f, 2).tolist() == [[[[1.5]]]]
    with pytest.raises(ValueError, match="multiples"):
        area_downsample(np.zeros((1, 1, 3, 3), np.uint8), 2)


def test_factory_and_config(tmp_path):
    _, coords, path = _store_2d(tmp_path)
    record = SlideRecord(slide_id="s", path=str(path), labels={})
    plain = SourceFactory.from_config(DataConfig())
    ctx = SourceFactory.from_config(DataConfig(context=3), reuse=True)
    assert plain.views == 1 and ctx.views == 2
    assert isinstance(ctx(record), ContextSource) and ctx(record).patch_shape == (6, 8, 8)
    assert ctx(record) is ctx(record)  # kept per run
    assert not isinstance(plain(record), ContextSource)
    assert DataConfig().context == 1 and DataConfig().views == 1 and DataConfig(context=2).views == 2
    with pytest.raises(ConfigError, match="data.context"):
        DataConfig(context=0)
    with pytest.raises(ConfigError, match="data.context"):
        DataConfig(context=3, mode="features")


@pytest.mark.parametrize("dims", [2, 3])
def test_model_embeds_both_views(dims):
    """The model takes `(n, 2 C, ...)` from `views=2` alone; the context view changes the embedding."""
    cfg = ModelConfig(
        encoder="ips_cnn_tiny", in_chans=1, spatial_dims=dims, patch_size=8, d_model=16, n_heads=2, d_mlp=16
    )
    torch.manual_seed(0)
    model = build_model(cfg, views=2).eval()
    x = torch.randint(0, 255, (5, 2, *([8] * dims)), dtype=torch.uint8)
    with torch.no_grad():
        emb = model.embed_content(x)
        assert emb.shape == (5, 16)
        y = x.clone()
        y[:, 1] = 255 - y[:, 1]  # another context, the same patch
        assert not torch.allclose(model.embed_content(y), emb)
        # the embedding is the projection of [f(patch), f(context)] through the one encoder
        f = model.encoder(model.normalize(x[:, :1].contiguous())), model.encoder(model.normalize(x[:, 1:]))
        torch.testing.assert_close(emb, model.project(torch.cat(f, dim=1)))
    logits, attn = model.train()(x[None], torch.zeros(1, 5, dims))
    logits["label"].sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_experiment_default_is_off():
    assert ExperimentConfig().data.context == 1


@pytest.mark.slow
def test_train_predict_heatmap_with_context(tmp_path):
    """The documented path with `data.context=2`: training (augmentation and explore slots on), its
    validation logits equal `ips predict`'s bit for bit, and `ips heatmap` draws every cell."""
    import zarr

    from ips.cli.main import main
    from ips.data.manifest import read_manifest
    from ips.infer.loop import load, predict_slides
    from ips.training.loop import train
    from tests.train_fixtures import make_cross_slides, tiny_config

    manifest = make_cross_slides(tmp_path / "data", n_train=4, n_val=2)
    cfg = tiny_config(train={"epochs": 1}, selection={"explore": 0.25}, data={"context": 2, "augment": True})
    seen: dict[str, object] = {}

    def capture(trainer, row):
        seen["logits"] = trainer.validation_logits()

    train(
        cfg,
        manifest=manifest,
        run_dir=tmp_path / "run",
        show_progress=False,
        log=lambda s: None,
        epoch_hooks=[capture],
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    loaded = load(ckpt, "cpu")
    assert loaded.model.views == 2 and loaded.cfg.data.context == 2
    val = read_manifest(manifest, cfg.model.tasks, "val")
    report = predict_slides(loaded, val, tmp_path / "p")
    for i, r in enumerate(val):
        assert torch.equal(report.logits[r.slide_id]["label"], seen["logits"]["label"][i])
    path = str(tmp_path / "data" / val[0].path)
    assert (
        main(["heatmap", "--checkpoint", str(ckpt), path, "--out", str(tmp_path / "hm"), "--top-k", "3"]) == 0
    )
    scores = zarr.open_group(str(tmp_path / "hm" / val[0].slide_id / "scores.zarr"), mode="r")["attention"][
        ...
    ]
    assert scores.shape == (64, 1) and np.isclose(scores.sum(), 1.0)  # every cell; shares sum to 1


def test_a_model_without_context_refuses_context_data(tmp_path):
    """Views of the data and of the model must agree: a one-view model does not read two-view items."""
    from ips.infer.engine import check_model_fits

    _, _, path = _store_2d(tmp_path)
    record = SlideRecord(slide_id="s", path=str(path), labels={})
    cfg = ModelConfig(encoder="ips_cnn_tiny", in_chans=3, patch_size=8, d_model=16, n_heads=2, d_mlp=16)
    source = SourceFactory(context=3)(record)
    check_model_fits(source, cfg, features=False, where="s", views=2)
    with pytest.raises(ConfigError, match=r"\(6, 8, 8\)"):
        check_model_fits(source, cfg, features=False, where="s", views=1)


def test_a_pretrained_encoder_serves_both_views(tmp_path):
    """`ips pretrain` trains the encoder on single patches; with `data.context` the same weights embed
    both views (the documented path: pretrain, then `model.pretrained=P/encoder.pt`)."""
    from ips.config import apply_overrides
    from ips.pretrain import ENCODER_FILE, pretrain_encoder

    image = random_image((3, 64, 64), seed=2)
    stores = [
        str(write_store(tmp_path / f"s{i}.zarr", np.roll(image, 8 * i, axis=2), patch_size=16))
        for i in range(2)
    ]
    base = {
        "model": {"encoder": "ips_cnn_tiny", "patch_size": 16, "d_model": 16, "n_heads": 2, "d_mlp": 16},
        "data": {"context": 3},
        "pretrain": {"epochs": 1, "patches_per_epoch": 32, "batch_size": 16, "patches_per_slide": 16},
    }
    cfg = ExperimentConfig.from_dict(base)
    pretrain_encoder(cfg, stores, tmp_path / "p", device="cpu", show_progress=False, log=lambda s: None)
    weights = str(tmp_path / "p" / ENCODER_FILE)
    trained = ExperimentConfig.from_dict(apply_overrides(base, [f"model.pretrained={weights}"]))
    model = build_model(trained.model, views=trained.data.views)
    saved = torch.load(weights)
    assert model.views == 2 and saved.keys() == model.encoder.state_dict().keys()
    for k, v in model.encoder.state_dict().items():
        torch.testing.assert_close(v, saved[k])


def test_augmentation_draws_one_transform_per_item():
    """A patch and its context are centred on one point: flips, turns and colour change them alike."""
    from ips.data.augment import PatchAugment

    torch.manual_seed(0)
    view = torch.rand(16, 3, 8, 8)
    x = torch.cat([view, view], dim=1)  # (n, 2 C, 8, 8): equal views
    out = PatchAugment(color_jitter=0.2, views=2)(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out[:, :3], out[:, 3:])
    assert not torch.allclose(out[:, :3], view)
    # the stain jitter acts on each view's 3 channels: the first view is the 3-channel augmentation
    alone = PatchAugment(color_jitter=0.2, flips=False, rot90=False)(view, torch.Generator().manual_seed(1))
    both = PatchAugment(color_jitter=0.2, flips=False, rot90=False, views=2)(
        x, torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(both[:, :3], alone)
