"""Self-supervised pretraining (`ips pretrain`), the pretrained encoder file, the staged training recipe,
and the small-object generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from data_prep.testing import patch_fraction
from ips.config import ConfigError, ExperimentConfig, apply_overrides
from ips.model.encoders import build_encoder
from ips.pretrain import ENCODER_FILE, pretrain_encoder
from ips.synthetic import small_objects as so
from ips.synthetic._store import TRUTH_GROUP

TINY = {
    "model": {
        "encoder": "ips_cnn_tiny",
        "in_chans": 3,
        "spatial_dims": 2,
        "patch_size": 16,
        "d_model": 16,
        "n_heads": 2,
        "d_mlp": 16,
        "pos_enc": "none",
        "tasks": [{"name": "label", "kind": "binary"}],
    },
    "selection": {"memory_size": 4, "iter_size": 16},
    "train": {"epochs": 1, "batch_size": 2, "seed": 0},
    "pretrain": {
        "epochs": 3,
        "patches_per_epoch": 256,
        "batch_size": 64,
        "patches_per_slide": 16,
        "lr": 3e-3,
    },
}


def cfg_of(*overrides: str) -> ExperimentConfig:
    return ExperimentConfig.from_dict(apply_overrides(TINY, list(overrides)))


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    """6 small-object slides of 128 px, 16-px patches (64 patches each): manifest path."""
    return so.make_small_object_dataset(
        tmp_path_factory.mktemp("so"),
        6,
        size=128,
        patch_size=16,
        seed=1,
        split_fractions=(0.67, 0.33, 0.0),
        n_distractors=(2, 3),
    )


def _stores(manifest: Path) -> list[str]:
    return sorted(str(p) for p in (manifest.parent / "stores").glob("*.zarr"))


# --- generator ------------------------------------------------------------------------------------------


def test_generator_truth_matches_what_it_drew():
    for i, positive in enumerate([True, False, True]):
        s = so.render_small_object_slide(
            so.slide_rng(3, i), 512, 32, positive=positive, max_object_fraction=0.02
        )
        assert s.label == int(positive)
        glands = [o for o in s.objects if o.kind == "gland"]
        assert len(glands) == int(positive)
        assert sum(o.kind != "gland" for o in s.objects) >= 4  # distractors in positives and negatives
        if positive:
            t = glands[0]
            np.testing.assert_array_equal(s.target_mask, so.disc_mask((512, 512), t.center, t.radius))
            assert 0 < s.target_mask.mean() <= 0.02  # a low object-to-image ratio
            assert 2 <= (patch_fraction(s.target_mask, 32) > 0).sum() <= 9  # a few patches
        else:
            assert not s.target_mask.any()
        assert not (s.target_mask & s.distractor_mask).any()
    a = so.render_small_object_slide(so.slide_rng(3, 0), 256, 32, positive=True)
    b = so.render_small_object_slide(so.slide_rng(3, 0), 256, 32, positive=True)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.objects == b.objects


def test_generator_store_truth(tiny_set: Path):
    import csv

    with tiny_set.open() as f:
        rows = list(csv.DictReader(f))
    assert {r["label"] for r in rows} == {"0", "1"}
    for r in rows:
        g = zarr.open_group(str(tiny_set.parent / r["path"]), mode="r")
        truth = np.asarray(g[f"{TRUTH_GROUP}/lesion"][...])
        assert truth.shape == (64,)  # tissue everywhere: every patch in the grid
        assert int(g[TRUTH_GROUP].attrs["label"]) == int(r["label"]) == int((truth > 0).any())
        target = g[TRUTH_GROUP].attrs["target"]
        if target is not None:  # recompute the per-patch share from the recorded disc
            mask = so.disc_mask((128, 128), target["center"], target["radius"])
            coords = np.asarray(g["grids/default/coords"][...])
            np.testing.assert_allclose(truth, patch_fraction(mask, 16)[tuple((coords // 16).T)], atol=1e-6)


# --- pretraining ----------------------------------------------------------------------------------------


def _sparse_sources(n_slides: int = 3, n: int = 100, content_every: int = 10):
    """Slides of `n` blank 8-px patches of which every `content_every`-th (by index) holds a bright square
    whose size codes the slide and index: `InMemoryPatchSource`s."""
    from ips.data.sources import InMemoryPatchSource

    sources = []
    for s in range(n_slides):
        x = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
        for i in range(0, n, content_every):
            x[i, 0, 1 : 2 + (i + s) % 6, 2:5] = 200
        sources.append(InMemoryPatchSource(x))
    return sources


def test_content_oversample_keeps_the_patches_that_show_something():
    from ips.pretrain.sampler import StorePatchSampler, content_score

    sources = _sparse_sources()
    plain = StorePatchSampler(sources, batch_size=8, per_slide=4)
    dense = StorePatchSampler(sources, batch_size=8, per_slide=4, oversample=16)
    blank_plain = blank_dense = total = 0
    for a, b in zip(plain.batches(20, seed=0, epoch=1), dense.batches(20, seed=0, epoch=1)):
        assert a.shape == b.shape == (8, 1, 8, 8) and b.dtype == torch.uint8
        blank_plain += int((content_score(a) == 0).sum())
        blank_dense += int((content_score(b) == 0).sum())
        total += len(a)
    # one patch in 10 has content: a uniform draw is ~90% blank; 16x oversampling leaves almost none
    assert blank_plain > 0.75 * total
    assert blank_dense < 0.05 * total
    # seeded: the same draw again
    again = StorePatchSampler(sources, batch_size=8, per_slide=4, oversample=16)
    for b, c in zip(dense.batches(3, seed=0, epoch=2), again.batches(3, seed=0, epoch=2)):
        assert torch.equal(b, c)


def test_content_oversample_is_checked():
    from ips.pretrain.sampler import StorePatchSampler

    with pytest.raises(ValueError, match="oversample"):
        StorePatchSampler(_sparse_sources(), batch_size=8, per_slide=4, oversample=0)
    with pytest.raises(ConfigError, match="pretrain.content_oversample"):
        cfg_of("pretrain.content_oversample=0")


@pytest.mark.parametrize("method", ["simclr", "rotation"])
def test_pretraining_lowers_its_loss(tiny_set: Path, tmp_path: Path, method: str):
    cfg = cfg_of(f"pretrain.method={method}", "pretrain.epochs=4")
    result = pretrain_encoder(
        cfg, _stores(tiny_set), tmp_path, device="cpu", show_progress=False, log=lambda s: None
    )
    losses = result["losses"]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    for name in (ENCODER_FILE, "encoder.json", "state.pt", "loss.png", "loss.csv"):
        assert (tmp_path / name).is_file()


def test_pretraining_resumes_exactly(tiny_set: Path, tmp_path: Path):
    cfg = cfg_of("pretrain.epochs=2")
    quiet = {"device": "cpu", "show_progress": False, "log": lambda s: None}
    full = pretrain_encoder(cfg, _stores(tiny_set), tmp_path / "a", **quiet)
    pretrain_encoder(cfg, _stores(tiny_set), tmp_path / "b", stop_after_epochs=1, **quiet)
    resumed = pretrain_encoder(cfg, _stores(tiny_set), tmp_path / "b", **quiet)
    assert resumed["losses"] == pytest.approx(full["losses"])
    a = torch.load(tmp_path / "a" / ENCODER_FILE)
    b = torch.load(tmp_path / "b" / ENCODER_FILE)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    with pytest.raises(ConfigError, match="different config"):
        pretrain_encoder(cfg_of("pretrain.lr=1e-4"), _stores(tiny_set), tmp_path / "b", **quiet)


def test_pretraining_3d(tmp_path: Path):
    from ips.synthetic.lesions import make_lesion_dataset

    manifest = make_lesion_dataset(tmp_path / "d", 2, 32, 8, 0, spatial_dims=3)
    cfg = cfg_of(
        "model.in_chans=1",
        "model.spatial_dims=3",
        "model.patch_size=8",
        "pretrain.epochs=1",
        "pretrain.batch_size=16",
        "pretrain.patches_per_epoch=32",
        "pretrain.patches_per_slide=8",
    )
    for method in ("rotation", "simclr"):
        out = tmp_path / method
        result = pretrain_encoder(
            cfg_of(
                *[
                    "model.in_chans=1",
                    "model.spatial_dims=3",
                    "model.patch_size=8",
                    "pretrain.epochs=1",
                    "pretrain.batch_size=16",
                    "pretrain.patches_per_epoch=32",
                    "pretrain.patches_per_slide=8",
                    f"pretrain.method={method}",
                ]
            ),
            _stores(manifest),
            out,
            device="cpu",
            show_progress=False,
            log=lambda s: None,
        )
        assert result["method"] == method and np.isfinite(result["losses"][0])
        build_encoder(
            "ips_cnn_tiny", in_chans=1, spatial_dims=3, patch_size=8, pretrained=str(out / ENCODER_FILE)
        )
    assert cfg.pretrain.resolved_method(3) == "rotation"


# --- the encoder file -----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_encoder_file_round_trips_into_model_pretrained(tiny_set: Path, tmp_path: Path, norm: str):
    from ips.model.ips_model import build_model

    cfg = cfg_of(f"model.encoder_norm={norm}", "pretrain.epochs=1")
    pretrain_encoder(cfg, _stores(tiny_set), tmp_path, device="cpu", show_progress=False, log=lambda s: None)
    saved = torch.load(tmp_path / ENCODER_FILE)
    model = build_model(
        cfg_of(f"model.encoder_norm={norm}", f"model.pretrained={tmp_path / ENCODER_FILE}").model
    )
    for k, v in model.encoder.state_dict().items():
        torch.testing.assert_close(v, saved[k])


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_ips_embed_uses_the_pretrained_encoder(tiny_set: Path, tmp_path: Path, norm: str):
    """`ips embed --pretrained DIR/encoder.pt` takes the encoder's norm from encoder.json, and the
    features it writes are that encoder's outputs."""
    import shutil

    import numpy as np
    import zarr

    from ips.cli.main import main
    from ips.model.encoders import build_encoder
    from ips.model.ips_model import normalize_pixels, pixel_stats

    cfg = cfg_of(f"model.encoder_norm={norm}", "pretrain.epochs=1")
    pretrain_encoder(
        cfg, _stores(tiny_set), tmp_path / "pt", device="cpu", show_progress=False, log=lambda s: None
    )
    store = tmp_path / "s.zarr"
    shutil.copytree(_stores(tiny_set)[0], store)
    weights = tmp_path / "pt" / ENCODER_FILE
    m = cfg.model
    rc = main(
        [
            "embed",
            str(store),
            "--encoder",
            m.encoder,
            "--pretrained",
            str(weights),
            "--dtype",
            "float32",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    features = np.asarray(zarr.open_group(str(store), mode="r")["features/default/embeddings"][:4])
    enc = build_encoder(
        m.encoder,
        in_chans=m.in_chans,
        spatial_dims=2,
        patch_size=m.patch_size,
        pretrained=str(weights),
        norm=norm,
    ).eval()
    from ips.data.zarr_source import ZarrPatchSource

    patches = ZarrPatchSource(store, grid="default").read(np.arange(4))
    mean, std = (torch.tensor(v).reshape(1, -1, 1, 1) for v in pixel_stats(enc, m.in_chans))
    with torch.no_grad():
        expected = enc(normalize_pixels(patches, mean, std)).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)


def test_mismatched_encoder_file_fails_clearly(tiny_set: Path, tmp_path: Path):
    cfg = cfg_of("model.encoder_norm=batch", "pretrain.epochs=1")
    pretrain_encoder(cfg, _stores(tiny_set), tmp_path, device="cpu", show_progress=False, log=lambda s: None)
    path = str(tmp_path / ENCODER_FILE)
    kw = {"in_chans": 3, "spatial_dims": 2, "patch_size": 16, "pretrained": path}
    with pytest.raises(ConfigError, match=r"^model\.pretrained: .*encoder_norm") as e:
        build_encoder("ips_cnn_tiny", norm="group", **kw)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^model\.pretrained: .*ips_cnn_small"):
        build_encoder("ips_cnn_small", norm="batch", **kw)
    # without the encoder.json beside it, the state_dict itself tells
    bare = tmp_path / "bare.pt"
    bare.write_bytes((tmp_path / ENCODER_FILE).read_bytes())
    with pytest.raises(ConfigError, match=r"^model\.pretrained: .*BatchNorm.*encoder_norm=batch"):
        build_encoder("ips_cnn_tiny", norm="group", **{**kw, "pretrained": str(bare)})
    torch.save({"not": "weights"}, tmp_path / "junk.pt")
    with pytest.raises(ConfigError, match=r"^model\.pretrained: .*not an encoder state_dict"):
        build_encoder("ips_cnn_tiny", norm="group", **{**kw, "pretrained": str(tmp_path / "junk.pt")})


def test_pretrain_cli(tiny_set: Path, tmp_path: Path):
    import yaml

    from ips.cli.main import main

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "pt"
    assert (
        main(
            [
                "pretrain",
                *_stores(tiny_set),
                "--config",
                str(cfg_path),
                "--out",
                str(out),
                "--quiet",
                "--set",
                "pretrain.epochs=1",
            ]
        )
        == 0
    )
    assert (out / ENCODER_FILE).is_file()
    assert (
        main(
            [
                "pretrain",
                str(tiny_set),
                "--config",
                str(cfg_path),
                "--out",
                str(tmp_path / "pt2"),
                "--quiet",
                "--set",
                "pretrain.epochs=1",
                "pretrain.bogus=1",
            ]
        )
        == 2
    )


def test_overrides_after_the_options_join_the_positional_list():
    from ips.cli.main import build_parser, parse

    parser = build_parser()
    args = parse(
        parser, ["pretrain", "a.zarr", "--config", "c.yaml", "--out", "d", "x.y=1", "--quiet", "z=2"]
    )
    assert args.stores == ["a.zarr", "x.y=1", "z=2"] and args.quiet and args.out == "d"
    args = parse(parser, ["train", "--config", "c.yaml", "a.b=1", "--out", "r", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.out == "r"
    for stray in (["b.zarr"], ["--bogus"], ["k=v", "--bogus"]):  # not key=value: still an error
        with pytest.raises(SystemExit):
            parse(parser, ["pretrain", "a.zarr", "--config", "c.yaml", "--out", "d", *stray])
    with pytest.raises(SystemExit):  # a subcommand without an override list takes none
        parse(parser, ["demo", "--quick", "k=v"])


def test_pretrain_split_takes_only_that_split_of_a_manifest(tmp_path: Path, capsys):
    from ips.cli.main import main
    from ips.cli.pretrain import _expand

    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "slide_id,path,label,split\na,s/a.zarr,0,train\nb,/abs/b.zarr,1,val\nc,s/c.zarr,1,train\n"
    )
    assert _expand([str(manifest)]) == [str(tmp_path / "s/a.zarr"), "/abs/b.zarr", str(tmp_path / "s/c.zarr")]
    assert _expand([str(manifest), "x.zarr"], "train") == [
        str(tmp_path / "s/a.zarr"),
        str(tmp_path / "s/c.zarr"),
        "x.zarr",
    ]
    assert _expand([str(manifest)], "val") == ["/abs/b.zarr"]
    with pytest.raises(ValueError, match=r"m\.csv: no row of split 'test'"):
        _expand([str(manifest)], "test")
    no_split = tmp_path / "n.csv"
    no_split.write_text("slide_id,path,label\na,s/a.zarr,0\n")
    assert _expand([str(no_split)]) == [str(tmp_path / "s/a.zarr")]
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(__import__("yaml").safe_dump(TINY))
    args = [
        "pretrain",
        str(no_split),
        "--config",
        str(cfg_path),
        "--out",
        str(tmp_path / "pt"),
        "--split",
        "train",
    ]
    assert main(args) == 2
    assert "n.csv: --split train given, but the manifest has no split column" in capsys.readouterr().err
    assert not (tmp_path / "pt").exists()


# --- staged training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_frozen_encoder_warmup_leaves_encoder_unchanged(tiny_set: Path, tmp_path: Path, norm: str):
    from ips.training.loop import train

    cfg = cfg_of(
        f"model.encoder_norm={norm}", "train.epochs=2", "train.freeze_encoder_epochs=2", "data.augment=false"
    )
    train(
        cfg,
        manifest=tiny_set,
        run_dir=tmp_path / "run",
        resume=False,
        show_progress=False,
        log=lambda s: None,
    )
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    torch.manual_seed(cfg.train.seed)
    from ips.model.ips_model import build_model

    fresh = build_model(cfg.model).state_dict()
    enc = [k for k in fresh if k.startswith("encoder.")]
    assert any(k.endswith("running_mean") for k in enc) == (norm == "batch")
    for k in enc:  # weights and BatchNorm statistics alike
        torch.testing.assert_close(state[k], fresh[k])
    assert any(not torch.equal(state[k], fresh[k]) for k in fresh if not k.startswith("encoder."))


def test_encoder_lr_scale_sets_the_encoder_group():
    from ips.model.ips_model import build_model
    from ips.training.loop import param_groups

    cfg = cfg_of("train.lr=1e-3", "train.encoder_lr_scale=0.1")
    groups = param_groups(
        build_model(cfg.model), lr=cfg.train.lr, encoder_lr_scale=cfg.train.encoder_lr_scale
    )
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-3])
    with pytest.raises(ConfigError, match="train.freeze_encoder_epochs"):
        cfg_of("train.freeze_encoder_epochs=5")
