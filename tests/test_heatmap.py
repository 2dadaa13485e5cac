"""`ips heatmap`: files a pathologist opens (PNG, QuPath GeoJSON, NIfTI, zarr scores), exact geometry,
bounded host memory, clear errors, and heatmaps that find planted lesions after a short training."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from inference_fixtures import BINARY, MULTICLASS, make_store, tiny_cfg, write_checkpoint

from data_prep.pyramid import downsample2
from ips.cli.main import main
from ips.data.manifest import SlideRecord
from ips.data.open import make_source
from ips.data.store import open_store
from ips.infer.engine import infer_slide
from ips.infer.render import paint, pixel_boxes, read_thumbnail, thumbnail_level
from ips.infer.scale import GLOBAL_TOP

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slide2d(tmp_path_factory):
    """A 256 x 192 RGB store with its grid at level 1 (16-px patches there = 32 level-0 px), a 2-task
    checkpoint, and the heatmap CLI's output for it."""
    root = tmp_path_factory.mktemp("hm2d")
    store = make_store(root / "stores", "slide_a", size=(256, 192), patch=16, level=1, pyramid_max_size=32)
    cfg = tiny_cfg(tasks=[BINARY, MULTICLASS], memory_size=5, iter_size=16)
    ckpt = write_checkpoint(root / "model.pt", cfg)
    rc = main(["heatmap", "--checkpoint", str(ckpt), str(store), "--out", str(root / "out"), "--top-k", "6"])
    assert rc == 0
    return {"store": store, "ckpt": ckpt, "cfg": cfg, "out": root / "out" / "slide_a"}


def test_files_per_slide(slide2d):
    from PIL import Image

    out = slide2d["out"]
    for name in ("heatmap.png", "heatmap.geojson", "scores.zarr", "top_patches.png"):
        assert (out / name).exists(), name
    assert not (out / "heatmap.nii.gz").exists()  # 2D: no NIfTI
    with Image.open(out / "heatmap.png") as im:
        assert im.size[0] >= 400 and im.size[1] >= 200  # two task panels with colour bars


def test_geojson_tiles_the_grid_in_level0_pixels(slide2d):
    """Shapely parses it; N polygons of (32 x 32) level-0 px tile the grid (no overlaps, total area
    N * 32^2); each polygon's pixels, downsampled 2x as the pyramid does, are exactly the patch."""
    from shapely.geometry import shape
    from shapely.ops import unary_union

    fc = json.loads((slide2d["out"] / "heatmap.geojson").read_text())
    store = open_store(slide2d["store"])
    coords = store.coords()  # (N, 2) (row, col) at level 1
    n = len(coords)
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == n == 8 * 6
    polys = [shape(f["geometry"]) for f in fc["features"]]
    assert all(p.is_valid and p.geom_type == "Polygon" for p in polys)
    assert sum(p.area for p in polys) == n * 32 * 32
    assert unary_union(polys).area == n * 32 * 32  # no overlaps
    level0 = coords * 2
    for f, p, (r, c) in zip(fc["features"], polys, level0):
        assert p.bounds == (c, r, c + 32, r + 32)  # (minx, miny, maxx, maxy): x = col, y = row
        assert f["properties"]["objectType"] == "detection"
    # map back: level-0 pixels under polygon i, 2x mean -> the level-1 patch the source reads
    source = make_source(SlideRecord("slide_a", str(slide2d["store"])), slide2d["cfg"])
    level0_px = np.asarray(store.level(0)[...])
    for i in (0, 7, n - 1):
        x0, y0, x1, y1 = (int(v) for v in polys[i].bounds)
        crop = level0_px[:, y0:y1, x0:x1]
        np.testing.assert_array_equal(downsample2(crop, (True, True)), source.read(np.array([i]))[0].numpy())


def test_geojson_measurements_and_selection(slide2d):
    fc = json.loads((slide2d["out"] / "heatmap.geojson").read_text())
    m = [f["properties"]["measurements"] for f in fc["features"]]
    assert set(m[0]) == {
        "a attention",
        "a attention x uniform",
        "a logit",
        "b attention",
        "b attention x uniform",
        "b logit",
        "selected",
    }
    for task in ("a", "b"):
        assert sum(x[f"{task} attention"] for x in m) == pytest.approx(1.0, rel=1e-5)
        # the colour scale's quantity: N * attention, mean 1 over the slide (uniform = 1)
        ratio = [x[f"{task} attention x uniform"] for x in m]
        assert ratio == pytest.approx([len(m) * x[f"{task} attention"] for x in m], rel=1e-6)
        assert sum(ratio) / len(m) == pytest.approx(1.0, rel=1e-5)
    selected = [f for f in fc["features"] if "classification" in f["properties"]]
    assert len(selected) == 5  # M
    assert all(f["properties"]["measurements"]["selected"] == 1.0 for f in selected)


def test_scores_zarr_matches_inference(slide2d):
    root = zarr.open_group(str(slide2d["out"] / "scores.zarr"), mode="r")
    store = open_store(slide2d["store"])
    n = len(store.coords())
    assert root["attention"].shape == (n, 2) and root["logit"].shape == (n, 2)
    assert root["head_logits"].shape == (n, 2, 4)
    np.testing.assert_array_equal(root["coords"][...], store.coords())
    np.testing.assert_array_equal(root["level0_coords"][...], store.coords() * 2)
    assert int(root["selected"][...].sum()) == 5
    assert root.attrs["tasks"] == ["a", "b"]
    from ips.model.checkpoint import load_model

    # oracle: every patch embedded at once, softmax over all N per task and head, mean over heads
    model, cfg = load_model(slide2d["ckpt"])
    source = make_source(SlideRecord("slide_a", str(slide2d["store"])), cfg)
    with torch.no_grad():
        emb = model.embed(source.read(np.arange(n)), torch.from_numpy(source.positions()))  # (N, D)
        logits = model.aggregator.attention_logits(emb[None])[0]  # (T, H, N)
    attention = logits.softmax(dim=-1).mean(dim=1).T.numpy()  # (N, T)
    np.testing.assert_allclose(root["attention"][...], attention, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(root["logit"][...], logits.mean(dim=1).T.numpy(), rtol=1e-5, atol=1e-6)
    top = np.lexsort((np.arange(n), -logits.mean(dim=(0, 1)).numpy()))[:5]  # the global top-M by score
    assert np.flatnonzero(root["selected"][...]).tolist() == sorted(top.tolist())


def test_thumbnail_comes_from_a_low_level_not_level0(tmp_path):
    store_path = make_store(tmp_path, "big", size=(256, 192), patch=16, pyramid_max_size=32)
    store = open_store(store_path)
    read_levels: list[int] = []
    real_level = store.level

    class Spy:
        def __init__(self, k):
            self.k, self.array = k, real_level(k)
            self.shape, self.ndim = self.array.shape, self.array.ndim

        def __getitem__(self, key):
            read_levels.append(self.k)
            return self.array[key]

    store.level = Spy  # type: ignore[method-assign]
    assert thumbnail_level(store, 64) == 2
    image, level = read_thumbnail(store, 64)
    assert level == 2 and image.shape == (64, 48, 3) and read_levels == [2]


def test_paint_equals_a_naive_overlay_with_overlaps():
    rng = np.random.default_rng(0)
    corners = rng.integers(0, 90, (40, 2))
    values = rng.random(40)
    boxes = pixel_boxes(corners, np.array([24, 16]), np.array([4.0, 4.0]), (25, 30))
    heat = paint(values, boxes, (25, 30))
    total, count = np.zeros((25, 30)), np.zeros((25, 30))
    for (r0, c0, r1, c1), v in zip(boxes, values):
        total[r0:r1, c0:c1] += v
        count[r0:r1, c0:c1] += 1
    expected = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    np.testing.assert_allclose(heat, expected, rtol=1e-12, equal_nan=True)
    # tiny patches (below a pixel) still paint one pixel each
    tiny = pixel_boxes(np.array([[0, 0], [1, 1]]), np.array([1, 1]), np.array([8.0, 8.0]), (4, 4))
    assert ((tiny[:, 2] - tiny[:, 0]) >= 1).all()


def test_nifti_heatmap_has_the_source_affine_and_orientation(tmp_path):
    """A NIfTI volume with a permuted, flipped, anisotropic affine -> store -> heatmap: the heatmap's
    affine is source_affine @ G (one voxel per 8^3 patch, centred on it), same axis codes, and voxel
    (a, b, c) holds the patch at level-0 (z, y, x) = 8 * (c, b, a)."""
    import nibabel as nib

    from data_prep.convert import PrepOptions, convert_file
    from data_prep.testing import write_nifti

    rng = np.random.default_rng(0)
    vol_xyz = rng.integers(1, 255, (48, 40, 32)).astype(np.uint8)  # NIfTI (I, J, K) = (x, y, z)
    affine = np.array([[0.0, 0.0, -2.0, 10.0], [1.5, 0.0, 0.0, -5.0], [0.0, 0.8, 0.0, 3.0], [0, 0, 0, 1]])
    src = write_nifti(tmp_path / "vol.nii.gz", vol_xyz, affine)
    store = convert_file(
        src,
        tmp_path / "stores",
        options=PrepOptions(patch_size=8, min_tissue=0.0, thumbnail=False, hash_source=False, threads=1),
    )
    cfg = tiny_cfg(in_chans=1, patch=8, dims=3, tasks=[BINARY], memory_size=4, iter_size=32)
    ckpt = write_checkpoint(tmp_path / "m3d.pt", cfg)
    assert (
        main(
            ["heatmap", "--checkpoint", str(ckpt), str(store), "--out", str(tmp_path / "hm"), "--top-k", "4"]
        )
        == 0
    )
    out = tmp_path / "hm" / "vol"
    img = nib.load(str(out / "heatmap.nii.gz"))
    assert img.shape == (6, 5, 4)  # (X/8, Y/8, Z/8)
    g = np.diag([8.0, 8.0, 8.0, 1.0])
    g[:3, 3] = 3.5  # the centre of voxels 0..7
    np.testing.assert_allclose(img.affine, affine @ g, atol=1e-6)
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(affine)
    scores = zarr.open_group(str(out / "scores.zarr"), mode="r")
    attention, level0 = scores["attention"][...][:, 0], scores["level0_coords"][...]
    data = np.asarray(img.dataobj)
    for i in (0, 17, len(level0) - 1):
        z, y, x = level0[i]
        assert data[x // 8, y // 8, z // 8] == pytest.approx(attention[i])
        # the heatmap voxel's world centre is the patch's world centre in the source
        world = img.affine @ np.array([x // 8, y // 8, z // 8, 1.0])
        np.testing.assert_allclose(world, affine @ np.array([x + 3.5, y + 3.5, z + 3.5, 1.0]), atol=1e-6)
    for name in ("slice_z.png", "slice_y.png", "slice_x.png", "heatmap.png", "top_patches.png"):
        assert (out / name).is_file(), name
    assert not (out / "heatmap.geojson").exists()


@pytest.mark.parametrize("kind", ["channels", "dims", "patch_size"])
def test_checkpoint_that_does_not_fit_the_store(tmp_path, capsys, kind):
    good = make_store(
        tmp_path / "stores", "good", size=(64, 64), patch=16, channels=1 if kind == "dims" else 3
    )
    if kind == "dims":
        bad = make_store(tmp_path / "stores", "bad", size=(32, 32, 32), channels=1, patch=16, background=0)
        cfg = tiny_cfg(in_chans=1, patch=16)
        want = "a 3D volume store, but the model is 2D"
    else:
        bad = make_store(
            tmp_path / "stores",
            "bad",
            size=(64, 64),
            channels=1 if kind == "channels" else 3,
            patch=16 if kind == "channels" else 8,
        )
        cfg = tiny_cfg()
        want = "patches have shape " + ("(1, 16, 16)" if kind == "channels" else "(3, 8, 8)")
    ckpt = write_checkpoint(tmp_path / "m.pt", cfg)
    rc = main(
        [
            "heatmap",
            "--checkpoint",
            str(ckpt),
            str(bad),
            str(good),
            "--out",
            str(tmp_path / "o"),
            "--top-k",
            "0",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1  # the good store is still drawn
    assert (tmp_path / "o" / "good" / "heatmap.png").is_file()
    line = next(s for s in err.splitlines() if s.startswith("ips heatmap: failed: bad ("))
    assert str(bad) in line and want in line, err


def test_bad_usage_exits_2(tmp_path, slide2d, capsys):
    out = str(tmp_path / "o")
    assert (
        main(
            [
                "heatmap",
                "--checkpoint",
                str(slide2d["ckpt"]),
                str(slide2d["store"]),
                "--out",
                out,
                "--task",
                "nope",
            ]
        )
        == 2
    )
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert (
        main(["heatmap", "--checkpoint", str(tmp_path / "missing.pt"), str(slide2d["store"]), "--out", out])
        == 2
    )


# VmHWM (this process image's peak RSS), not ru_maxrss: Linux carries ru_maxrss over exec, so a child
# forked from a big test process would report the parent's size
_RSS_SCRIPT = textwrap.dedent("""
    import sys
    from ips.cli.main import main
    rc = main(sys.argv[1:])
    with open("/proc/self/status") as f:
        print("MAXRSS_KB", next(line.split()[1] for line in f if line.startswith("VmHWM:")))
    sys.exit(rc)
""")


@pytest.mark.slow
@pytest.mark.rss
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_host_memory_does_not_grow_with_slide_size(tmp_path):
    """Peak RSS of `ips heatmap` in a subprocess at 1,024 and 16,384 patches (16x; 16-px patches on a
    512^2 and a 2048^2 slide, mostly unwritten background). Both overlays are drawn on a 512-px level.
    Tolerance: the big slide may use at most 16 MB more (measured: 5 MB, i.e. ~350 B per extra patch:
    O(N) scalars such as coords, logits and pixel boxes), below even one full-resolution float overlay of
    this small slide (2048^2 x 4 B x 3 channels = 48 MB; of a real slide, tens of GB)."""
    cfg = tiny_cfg(patch=16, memory_size=8, iter_size=256)
    ckpt = write_checkpoint(tmp_path / "m.pt", cfg)
    peaks = {}
    for name, side in (("small", 512), ("big", 2048)):
        store = make_store(tmp_path / "stores", name, size=(side, side), patch=16, fill=0.05)
        assert open_store(store).grids["default"].n_patches == (side // 16) ** 2
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _RSS_SCRIPT,
                "heatmap",
                "--checkpoint",
                str(ckpt),
                str(store),
                "--out",
                str(tmp_path / "out"),
                "--thumb-size",
                "512",
                "--top-k",
                "4",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
            env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        )
        assert proc.returncode == 0, proc.stderr
        peaks[name] = int(proc.stdout.split("MAXRSS_KB")[1].split()[0]) * 1024
    growth = peaks["big"] - peaks["small"]
    assert growth < 16e6, {k: v / 1e6 for k, v in peaks.items()}


@pytest.mark.slow
@pytest.mark.learning
def test_heatmap_ranks_planted_lesions_above_the_rest(tmp_path):
    """Train briefly (ips.training.loop.train) on 32 synthetic H&E-like slides with planted lesions (slide label
    only, no positional encoding: with it this tiny model memorises positions), then score every patch of
    the held-out positive slides. Measured (`benchmarks/inference.py --seeds 0 1 2`): mean per-slide
    AUROC of attention vs "overlaps a lesion" 0.85 / 0.86 / 0.90 and vs ">= half lesion" 0.996 / 0.996 /
    0.984; this test runs seed 0. Thresholds 0.75 and 0.9 leave ~0.1 margin. Chance is 0.5."""
    from ips.model.metrics import auroc
    from ips.synthetic.lesions import make_lesion_dataset
    from ips.training.loop import train

    manifest = make_lesion_dataset(
        tmp_path / "data", n_slides=32, size=384, patch_size=32, seed=0, split_fractions=(0.7, 0.0, 0.3)
    )
    cfg = tiny_cfg(
        patch=32,
        tasks=[{"name": "lesion", "kind": "binary", "label_column": "label"}],
        memory_size=8,
        iter_size=64,
        pos_enc="none",
    )
    cfg = cfg.from_dict(
        {
            **cfg.to_dict(),
            "data": {"augment": True, "read_threads": 1},
            "train": {
                "epochs": 30,
                "batch_size": 4,
                "lr": 3e-3,
                "weight_decay": 0.0,
                "warmup_epochs": 0.5,
                "seed": 0,
                "device": "cpu",
                "monitor": "train_loss",
            },
        }
    )
    train(cfg, manifest=manifest, run_dir=tmp_path / "run", show_progress=False, log=lambda s: None)
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    from ips.data.manifest import read_manifest
    from ips.model.checkpoint import load_model

    model, cfg = load_model(ckpt)
    test_pos = [r for r in read_manifest(manifest, cfg.model.tasks, "test") if r.labels["lesion"] == 1]
    assert len(test_pos) >= 4
    any_lesion, mostly_lesion = [], []
    for r in test_pos:
        inf = infer_slide(model, make_source(r, cfg), memory_size=8, iter_size=64)
        truth = np.asarray(zarr.open_group(r.path, mode="r")["ips_truth/lesion"][...])
        any_lesion.append(auroc(inf.attention[:, 0], truth > 0))
        mostly_lesion.append(auroc(inf.attention[:, 0], truth >= 0.5))
    assert np.mean(any_lesion) >= 0.75, any_lesion
    assert np.isfinite(mostly_lesion).sum() >= 3  # NaN: no patch is half lesion on that slide
    assert np.nanmean(mostly_lesion) >= 0.9, mostly_lesion
    # the CLI writes the same scores
    r = test_pos[0]
    assert (
        main(["heatmap", "--checkpoint", str(ckpt), r.path, "--out", str(tmp_path / "hm"), "--top-k", "8"])
        == 0
    )
    saved = zarr.open_group(str(tmp_path / "hm" / r.slide_id / "scores.zarr"), mode="r")["attention"][...]
    inf = infer_slide(model, make_source(r, cfg), memory_size=8, iter_size=64)
    np.testing.assert_allclose(saved, inf.attention, rtol=1e-5, atol=1e-8)


def test_feature_checkpoint_draws_from_the_features_grid(tmp_path):
    """A model on precomputed features: scores per feature vector, geometry and gallery from their grid."""
    from ips.config import ExperimentConfig
    from ips.infer.embed import embed_store
    from ips.model.encoders import build_encoder

    store = make_store(tmp_path / "stores", "f1", size=(128, 96), patch=16, level=1, pyramid_max_size=32)
    encoder = build_encoder(
        "ips_cnn_tiny",
        in_chans=3,
        spatial_dims=2,
        patch_size=16,
        pretrained=False,
        feature_dim=None,
        d_model=32,
    )
    info = embed_store(store, encoder, chunk_size=16, dtype="float32", read_threads=1, prefetch=0)
    cfg = ExperimentConfig.from_dict(
        {
            "model": {
                "encoder": "features",
                "feature_dim": info.dim,
                "d_model": 32,
                "n_heads": 4,
                "d_mlp": 32,
                "tasks": [BINARY],
            },
            "data": {"mode": "features"},
            "selection": {"memory_size": 4, "iter_size": 8},
            "train": {"device": "cpu"},
        }
    )
    ckpt = write_checkpoint(tmp_path / "m.pt", cfg)
    assert (
        main(
            ["heatmap", "--checkpoint", str(ckpt), str(store), "--out", str(tmp_path / "hm"), "--top-k", "4"]
        )
        == 0
    )
    out = tmp_path / "hm" / "f1"
    scores = zarr.open_group(str(out / "scores.zarr"), mode="r")
    np.testing.assert_array_equal(scores["level0_coords"][...], open_store(store).coords() * 2)
    assert (out / "top_patches.png").is_file() and (out / "heatmap.geojson").is_file()


def _stored_peak(slide_dir: Path, task: int = 0) -> float:
    """log2 of the slide's highest N * a, by hand from its scores.zarr."""
    a = np.asarray(zarr.open_group(str(slide_dir / "scores.zarr"), mode="r")["attention"][...])[:, task]
    return float(np.log2(len(a) * a.max()))


def _peaky_checkpoint(path: Path, cfg) -> Path:
    """A random model whose attention logits are scaled up, so slides' peaks lie well above uniform."""
    from ips.model.checkpoint import save_checkpoint
    from ips.model.ips_model import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.aggregator.k_proj.weight *= 400.0
    save_checkpoint(path, model=model, config=cfg, epoch=0, metrics={})
    return path


def test_shared_scales_are_the_same_on_every_slide_drawn(tmp_path, capsys):
    """`--scale cohort`: every slide's PNG uses one scale whose top is the highest peak of all of them
    (read back from each scores.zarr by hand); `--scale global`: the viewer's fixed top on every slide;
    per slide, each its own. The threshold is N * a."""
    stores = [
        str(make_store(tmp_path / "st", "sa", size=(128, 96), seed=1)),
        str(make_store(tmp_path / "st", "sb", size=(128, 96), seed=2, fill=0.5)),
        str(make_store(tmp_path / "st", "sc", size=(96, 96), seed=3)),
    ]
    ckpt = _peaky_checkpoint(tmp_path / "m.pt", tiny_cfg(memory_size=4))
    for kind in ("slide", "global", "cohort"):
        out = tmp_path / kind
        argv = ["heatmap", "--checkpoint", str(ckpt), *stores, "--out", str(out), "--top-k", "0"]
        assert main([*argv, "--scale", kind, "--threshold", "0.5"]) == 0
        peaks = {s: _stored_peak(out / s) for s in ("sa", "sb", "sc")}
        assert len(set(peaks.values())) == 3  # three different attention ranges
        assert sorted(peaks.values())[1] > 1.0  # past the per-slide floor: per slide, tops differ
        for s in peaks:
            assert (out / s / "heatmap.png").is_file()
            used = zarr.open_group(str(out / s / "scores.zarr"), mode="r").attrs["colour_scales"]["a"]
            assert used["threshold"] == -1.0 and used["kind"] == (
                "slide" if kind == "slide" else "global"
            )  # 0.5x uniform = log2 -1
            own = max(peaks[s], 1.0, -1.0 + 1.0)
            cohort = max(*peaks.values(), 1.0)
            want = {"slide": own, "cohort": cohort, "global": GLOBAL_TOP}[kind]
            assert used["top"] == pytest.approx(want, abs=1e-6)
            if kind == "cohort":
                assert used["slides"] == 3 and "3 slides drawn together" in used["legend"]
            if kind == "global":  # the viewer's global scale, as its JSON gives it
                assert {k: used[k] for k in ("top", "kind")} == {"top": GLOBAL_TOP, "kind": "global"}
                assert "slides" not in used
    printed = capsys.readouterr().out
    assert "cohort colour scale of a over 3 slides" in printed and "global colour scale of a" in printed
    argv = ["heatmap", "--checkpoint", str(ckpt), stores[0], "--out", str(tmp_path / "x")]
    assert main([*argv, "--threshold", "0"]) == 2
    assert "--threshold" in capsys.readouterr().err


def test_global_scale_draws_volume_slices(tmp_path):
    store = make_store(tmp_path / "st", "v", size=(32, 32, 32), channels=1, patch=8)
    ckpt = write_checkpoint(tmp_path / "m.pt", tiny_cfg(in_chans=1, patch=8, dims=3))
    out = tmp_path / "o"
    argv = ["heatmap", "--checkpoint", str(ckpt), str(store), "--out", str(out), "--scale", "cohort"]
    assert main([*argv, "--top-k", "0", "--quiet"]) == 0
    for name in ("heatmap.png", "slice_z.png", "slice_y.png", "slice_x.png", "heatmap.nii.gz"):
        assert (out / "v" / name).is_file()
    used = zarr.open_group(str(out / "v" / "scores.zarr"), mode="r").attrs["colour_scales"]["a"]
    assert used["kind"] == "global" and used["top"] == pytest.approx(max(_stored_peak(out / "v"), 1.0))
