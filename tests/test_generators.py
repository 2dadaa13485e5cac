"""Synthetic dataset generators: determinism, labels consistent with what was placed, truth, stores."""

from __future__ import annotations

import csv
import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest

from data_prep.testing import cells_to_grid, patch_fraction
from ips.config import TaskConfig
from ips.synthetic import lesions as les
from ips.synthetic import megapixel_mnist as mm
from ips.synthetic._store import TRUTH_GROUP, GridSpec, grid_share, stratified_splits, truth_key

HAVE_WRITER = importlib.util.find_spec("data_prep.convert") is not None
needs_writer = pytest.mark.skipif(not HAVE_WRITER, reason="data_prep.convert (the store writer) is missing")


@pytest.fixture(scope="module")
def fake_mnist() -> tuple[np.ndarray, np.ndarray]:
    """6 random (hence pairwise different) 28 x 28 'digits' per class: `(60, 28, 28)` uint8, `(60,)`."""
    rng = np.random.default_rng(123)
    images = rng.integers(1, 256, (60, 28, 28), dtype=np.uint8)
    return images, np.repeat(np.arange(10), 6)


@pytest.fixture
def real_mnist(test_data: Path) -> tuple[np.ndarray, np.ndarray]:
    return mm.load_mnist_csv(test_data / "mnist_5k.csv.gz")


def _samples(images, labels, seed, n, **kw) -> list[mm.MegapixelSample]:
    pool = np.arange(len(labels))
    bank = mm.make_noise_bank(mm.PAPER_N_NOISE, seed)
    return [
        mm.make_sample(images, labels, pool, mm.sample_rng(seed, "train", i), noise_bank=bank, **kw)
        for i in range(n)
    ]


# --- Megapixel MNIST ------------------------------------------------------------------------------------


def test_mnist_deterministic_by_seed(fake_mnist):
    a = _samples(*fake_mnist, seed=3, n=3, canvas=(160, 200))
    b = _samples(*fake_mnist, seed=3, n=3, canvas=(160, 200))
    c = _samples(*fake_mnist, seed=4, n=3, canvas=(160, 200))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.image, y.image)
        assert x.placements == y.placements and x.labels == y.labels
    assert any(not np.array_equal(x.image, z.image) for x, z in zip(a, c))


def test_mnist_warp_keeps_the_canvas_and_draws_new_hands(real_mnist):
    """`warp` changes each digit's pixels only: same boxes, noise and labels as the plain canvas, every
    digit box differs from its source digit, keeps its ink near the centre and still reads as a digit
    of similar mass; strength 0 is the identity."""
    images, labels = real_mnist
    pool = np.arange(len(labels))
    bank = mm.make_noise_bank(mm.PAPER_N_NOISE, 0)

    def sample(warp: float) -> mm.MegapixelSample:
        rng, wrng = mm.sample_rng(0, "train", 7), np.random.default_rng([0, 0, 7, 1])
        return mm.make_sample(
            images, labels, pool, rng, canvas=(300, 300), noise_bank=bank, warp=warp, warp_rng=wrng
        )

    plain, warped = sample(0.0), sample(1.0)
    assert warped.placements == plain.placements and warped.labels == plain.labels
    np.testing.assert_array_equal(warped.noise, plain.noise)
    for p in warped.placements:
        box = warped.image[p.row : p.row + 28, p.col : p.col + 28].astype(float)
        src = images[p.index].astype(float)
        assert np.abs(box - src).mean() > 5  # a new hand, not the stored digit
        assert 0.6 < box.sum() / src.sum() < 1.6  # the same stroke mass, give or take the scale
        corr = np.corrcoef(box.ravel(), src.ravel())[0, 1]
        assert corr > 0.3, corr  # still that digit
    digit = images[0]
    np.testing.assert_array_equal(mm.warp_digit(digit, np.random.default_rng(0), 0.0), digit)
    again = mm.warp_digit(digit, np.random.default_rng(5), 1.0)
    np.testing.assert_array_equal(again, mm.warp_digit(digit, np.random.default_rng(5), 1.0))
    assert again.dtype == np.uint8 and again.shape == (28, 28)
    with pytest.raises(ValueError, match="warp_rng"):
        mm.make_sample(images, labels, pool, mm.sample_rng(0, "train", 0), warp=1.0)


def _check_sample(
    sample: mm.MegapixelSample,
    images: np.ndarray,
    labels: np.ndarray,
    scale: int,
    distinct_others: bool = True,
) -> None:
    """Every rule of the module docstring, recomputed from the placements without the module's helpers."""
    ps = sample.placements
    assert len(ps) == 5
    digits = [p.digit for p in ps]
    assert all(labels[p.index] == p.digit for p in ps)
    maj = sample.labels["majority"]
    assert digits.count(maj) == 3
    others = [d for d in digits if d != maj]
    assert len(others) == 2
    if distinct_others:
        assert others[0] != others[1]
    assert len({p.index for p in ps if p.digit == maj}) == 3  # 3 different images of the majority class
    assert sample.labels["max"] == max(digits)
    top_row = min(p.row for p in ps)
    assert sample.labels["top"] == min((p.col, p.digit) for p in ps if p.row == top_row)[1]
    assert sample.labels["multilabel"] == tuple(sorted(set(digits)))
    h, w = sample.image.shape
    for p in ps:  # inside the canvas, the digit drawn exactly (it owns its box)
        assert p.size == 28 * scale and 0 <= p.row <= h - p.size and 0 <= p.col <= w - p.size
        expected = np.kron(images[p.index], np.ones((scale, scale), dtype=np.uint8))
        np.testing.assert_array_equal(sample.image[p.row : p.row + p.size, p.col : p.col + p.size], expected)
    for p, q in itertools.combinations(ps, 2):  # boxes disjoint
        assert (
            p.row + p.size <= q.row
            or q.row + q.size <= p.row
            or p.col + p.size <= q.col
            or q.col + q.size <= p.col
        )


@pytest.mark.parametrize("scale", [1, 2])
def test_mnist_labels_match_placements_fake(fake_mnist, scale):
    images, labels = fake_mnist
    for s in _samples(images, labels, seed=0, n=20, canvas=(150, 180), digit_scale=scale):
        _check_sample(s, images, labels, scale)


def test_mnist_labels_match_placements_real(real_mnist):
    images, labels = real_mnist
    assert images.shape == (5000, 28, 28) and np.bincount(labels).tolist() == [500] * 10
    pools = mm.split_digit_pools(labels, seed=0)
    bank = mm.make_noise_bank(mm.PAPER_N_NOISE, 0)
    for i in range(10):
        s = mm.make_sample(
            images, labels, pools["val"], mm.sample_rng(0, "val", i), canvas=(300, 300), noise_bank=bank
        )
        _check_sample(s, images, labels, 1)
        assert all(p.index in set(pools["val"].tolist()) for p in s.placements)


def test_mnist_reference_rule_others(fake_mnist):
    images, labels = fake_mnist
    samples = _samples(images, labels, seed=1, n=60, canvas=(150, 150), distinct_others=False)
    for s in samples:
        _check_sample(s, images, labels, 1, distinct_others=False)
    # with the reference rule the two others sometimes share a class (about 1 in 9)
    assert any(len(s.labels["multilabel"]) == 2 for s in samples)


def test_mnist_noise_and_background(fake_mnist):
    images, labels = fake_mnist
    assert mm.default_n_noise((1500, 1500)) == 50 and mm.default_n_noise((300, 300)) == 2
    bank = mm.make_noise_bank(50, 0)
    assert bank.shape == (50, 28, 28) and bank.dtype == np.uint8
    assert all(200 <= b[b > 0].min() and (b > 0).sum() >= 28 for b in bank)  # strokes, 0.8-1.0 of 255
    (s,) = _samples(images, labels, seed=2, n=1, canvas=(300, 300), n_noise=40)
    assert s.noise.shape == (40, 3)
    outside = ~mm.boxes_mask(s.placements, (300, 300))
    assert 0 < (s.image[outside] > 0).mean() < 0.05  # black background, sparse noise strokes


def test_mnist_tiebreak_and_errors(fake_mnist):
    ps = [
        mm.Placement(digit=d, index=0, row=r, col=c, size=28)
        for d, r, c in [(7, 10, 90), (2, 10, 30), (7, 50, 0), (7, 80, 0), (5, 99, 99)]
    ]
    assert mm.labels_from_placements(ps) == {"majority": 7, "max": 7, "top": 2, "multilabel": (2, 5, 7)}
    with pytest.raises(ValueError, match="non-overlapping"):
        _samples(*fake_mnist, seed=0, n=1, canvas=(56, 56))
    with pytest.raises(ValueError, match="every class"):
        mm.make_sample(*fake_mnist, np.arange(6), np.random.default_rng(0), canvas=(200, 200))


def test_mnist_digit_pools_disjoint_and_stratified(fake_mnist):
    _, labels = fake_mnist
    pools = mm.split_digit_pools(labels, (0.5, 0.25, 0.25), seed=0)
    all_idx = np.concatenate(list(pools.values()))
    assert len(all_idx) == len(labels) == len(set(all_idx.tolist()))
    for split in mm.SPLITS:
        assert set(labels[pools[split]].tolist()) == set(range(10))
    assert not np.array_equal(
        pools["train"], mm.split_digit_pools(labels, (0.5, 0.25, 0.25), seed=1)["train"]
    )
    with pytest.raises(ValueError):
        mm.split_digit_pools(labels, (1.0, 0.0))


def test_mnist_tasks():
    tasks = mm.megapixel_mnist_tasks()
    assert [t.name for t in tasks] == ["majority", "max", "top", "multilabel"]
    assert all(isinstance(t, TaskConfig) and t.num_classes == 10 for t in tasks)
    assert [t.kind for t in tasks] == ["multiclass"] * 3 + ["multilabel"]
    assert mm.format_label((1, 3, 9)) == "1;3;9" and mm.format_label(4) == "4"


# --- lesion slides and volumes --------------------------------------------------------------------------


def _disc_overlap(lesion: les.Lesion, shape: tuple[int, ...], patch: int) -> np.ndarray:
    """Bool per grid cell: does the cell hold a pixel centre within the lesion? Geometry only."""
    cells = tuple(-(-s // patch) for s in shape)
    out = np.zeros(cells, dtype=bool)
    for cell in np.ndindex(*cells):
        lo = np.array(cell) * patch
        hi = np.minimum(lo + patch, shape) - 1
        nearest = np.clip(lesion.center, lo, hi)  # the cell's pixel nearest to the centre
        out[cell] = ((nearest - np.array(lesion.center)) ** 2).sum() <= lesion.radius**2
    return out


CASES = [(2, 192, 32), (3, 48, 16)]


@pytest.mark.parametrize(("dims", "size", "patch"), CASES)
def test_lesion_deterministic_by_seed(dims, size, patch):
    a = les.render_lesion_slide(np.random.default_rng(5), size, patch, positive=True, spatial_dims=dims)
    b = les.render_lesion_slide(np.random.default_rng(5), size, patch, positive=True, spatial_dims=dims)
    c = les.render_lesion_slide(np.random.default_rng(6), size, patch, positive=True, spatial_dims=dims)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.lesions == b.lesions and a.label == b.label == 1
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize(("dims", "size", "patch"), CASES)
def test_lesion_truth_matches_planted(dims, size, patch):
    for seed in range(3):
        s = les.render_lesion_slide(
            np.random.default_rng(seed), size, patch, positive=True, spatial_dims=dims
        )
        shape = (size,) * dims
        channels = 3 if dims == 2 else 1
        assert s.image.shape == (channels, *shape) and s.image.dtype == np.uint8
        assert 1 <= len(s.lesions) <= 3 and s.label == 1
        assert (s.lesion_mask <= s.tissue).all()  # lesions lie in tissue
        cells = patch_fraction(s.lesion_mask, patch)
        expected = np.zeros_like(cells, dtype=bool)
        for lesion in s.lesions:
            expected |= _disc_overlap(lesion, shape, patch)
        np.testing.assert_array_equal(cells > 0, expected)
        # the patch fraction is the pixel share
        n_pixels = s.lesion_mask.sum()
        assert np.isclose(cells.sum() * patch**dims, n_pixels)
        # the lesions are visible: darker (2D) / brighter (3D) than the rest of the tissue
        value = s.image.astype(float).mean(axis=0)
        inside, outside = value[s.lesion_mask].mean(), value[s.tissue & ~s.lesion_mask].mean()
        assert inside < outside - 15 if dims == 2 else inside > outside + 40


@pytest.mark.parametrize(("dims", "size", "patch"), CASES)
def test_lesion_negative_has_none(dims, size, patch):
    s = les.render_lesion_slide(np.random.default_rng(0), size, patch, positive=False, spatial_dims=dims)
    assert s.label == 0 and s.lesions == () and not s.lesion_mask.any()
    assert 0.15 < s.tissue.mean() < 0.9  # some tissue (or body) and some blank background


def test_lesion_global_colour_does_not_separate():
    """The mean tissue colour of positives and negatives overlaps: a lesion is found by looking, not by
    the slide's colour histogram."""
    means = {0: [], 1: []}
    for i in range(10):
        s = les.render_slide_2d(np.random.default_rng([9, i]), 512, 32, positive=bool(i % 2))
        means[i % 2].append(s.image[:, s.tissue].mean(axis=1))
    neg, pos = np.array(means[0]), np.array(means[1])
    assert ((neg.min(0) < pos.max(0)) & (pos.min(0) < neg.max(0))).all()


def test_patch_fraction_edges_and_splits():
    mask = np.zeros((5, 7), dtype=bool)
    mask[4, 6] = True
    frac = patch_fraction(mask, 4)
    assert frac.shape == (2, 2) and frac[1, 1] == 1 / 3  # edge cell: 1 x 3 pixels inside the image
    splits = stratified_splits([0] * 10 + [1] * 10, (0.6, 0.2, 0.2), seed=0)
    assert splits.count("train") == 12 and splits.count("val") == 4 and splits.count("test") == 4
    assert sum(s == "val" for s in splits[:10]) == 2
    assert les.slide_labels(9, 1 / 3, 0).sum() == 3
    assert les.lesion_tasks()[0].kind == "binary" and les.lesion_tasks()[0].column == "label"


def _brute_share(mask: np.ndarray, corner, size) -> float:
    sl = tuple(slice(max(c, 0), min(c + s, n)) for c, s, n in zip(corner, size, mask.shape))
    window = mask[sl]
    return float(window.mean()) if window.size else 0.0


@pytest.mark.parametrize("shape", [(23, 31), (9, 11, 13)])
def test_grid_share_is_the_mean_over_each_patch(shape):
    from data_prep.grid import grid_starts

    rng = np.random.default_rng(len(shape))
    mask = rng.random(shape) < 0.3
    dims = len(shape)

    def grid(size, patch, stride, factor):  # a grid as prep makes it, with a random half of it kept
        starts = [grid_starts(n // factor, patch, stride) for n in size]
        coords = np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, dims)
        return coords[np.sort(rng.choice(len(coords), len(coords) // 2 + 1, replace=False))]

    # the default grid (stride = patch on level 0): the same as the per-cell fractions
    p = 4
    coords = grid(shape, p, p, 1)
    np.testing.assert_allclose(
        grid_share(mask, coords, (p,) * dims, (1,) * dims),
        cells_to_grid(patch_fraction(mask, p), coords, p),
        atol=1e-6,
    )
    # an overlapping grid on level 1 (downsample 2): the mean over each patch's level-0 window
    coords = grid(shape, 3, 2, 2)
    expected = [_brute_share(mask.astype(np.float64), 2 * c, (6,) * dims) for c in coords]
    np.testing.assert_allclose(grid_share(mask, coords, (3,) * dims, (2,) * dims), expected, atol=1e-6)
    assert grid_share(mask, np.zeros((0, dims), np.int64), (3,) * dims, (2,) * dims).shape == (0,)


def test_grid_spec_parse():
    assert GridSpec.parse("halo:1:38:24") == GridSpec("halo", 1, 38, 24)
    for bad in ("halo:1:38", "halo:x:38:24", ":1:38:24", "default:0:50:50", "h:-1:38:24", "h:0:0:24"):
        with pytest.raises(ValueError, match=bad.replace("-", "\\-")):
            GridSpec.parse(bad)
    assert (
        truth_key("digit") == f"{TRUTH_GROUP}/digit"
        and truth_key("digit", "halo") == f"{TRUTH_GROUP}/halo/digit"
    )


# --- datasets on disk -----------------------------------------------------------------------------------


def _read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _open_complete(path: Path):
    import zarr

    from ips.format import names as sf

    assert (path / sf.COMPLETE_MARKER).is_file()
    return zarr.open_group(str(path), mode="r")


@needs_writer
def test_megapixel_mnist_dataset(tmp_path, fake_mnist):
    manifest = mm.make_megapixel_mnist(fake_mnist, tmp_path, 2, 1, 1, canvas=150, seed=0, patch_size=50)
    rows = _read_manifest(manifest)
    assert list(rows[0]) == ["slide_id", "path", "label", "split", "majority", "max", "top", "multilabel"]
    assert [r["split"] for r in rows] == ["train", "train", "val", "test"]
    for row in rows:
        g = _open_complete(manifest.parent / row["path"])
        assert not Path(row["path"]).is_absolute()
        assert g["0"].shape == (1, 150, 150)
        coords = g["grids/default/coords"][...]
        assert len(coords) == 9  # every patch kept, black or not
        truth = g[TRUTH_GROUP].attrs
        ps = [mm.Placement(**p) for p in truth["placements"]]
        labels = mm.labels_from_placements(ps)
        assert row["label"] == row["majority"] == str(labels["majority"])
        assert row["multilabel"] == ";".join(map(str, labels["multilabel"]))
        assert (row["max"], row["top"]) == (str(labels["max"]), str(labels["top"]))
        image = g["0"][0]
        for p in ps:
            np.testing.assert_array_equal(
                image[p.row : p.row + 28, p.col : p.col + 28], fake_mnist[0][p.index]
            )
        digit = g[f"{TRUTH_GROUP}/digit"][...]
        assert digit.shape == (9,) and 0 < digit.max() <= 1
    from ips.data.manifest import read_manifest  # the training side accepts it as written

    records = read_manifest(manifest, mm.megapixel_mnist_tasks(), split="train")
    assert len(records) == 2 and records[0].labels["multilabel"] == tuple(
        map(int, rows[0]["multilabel"].split(";"))
    )
    again = mm.make_megapixel_mnist(fake_mnist, tmp_path / "again", 2, 1, 1, canvas=150, seed=0)
    assert [r["multilabel"] for r in _read_manifest(again)] == [r["multilabel"] for r in rows]
    with pytest.raises(ValueError, match="multiple of patch_size"):
        mm.make_megapixel_mnist(fake_mnist, tmp_path / "bad", 1, 0, 0, canvas=160, patch_size=50)
    # a further grid: at level 1, overlapping; its truth is each window's share in the digit boxes
    halo = mm.make_megapixel_mnist(
        fake_mnist, tmp_path / "halo", 1, 0, 1, canvas=300, seed=0, extra_grids=[GridSpec("halo", 1, 38, 24)]
    )
    for row in _read_manifest(halo):
        g = _open_complete(halo.parent / row["path"])
        assert g["grids/halo"].attrs["level"] == 1 and list(g["grids/halo"].attrs["stride"]) == [24, 24]
        coords = g["grids/halo/coords"][...]
        assert len(coords) == 5 * 5 and coords.max() == 96  # starts 0, 24, ..., 96 on the 150-px level 1
        boxes = mm.boxes_mask([mm.Placement(**p) for p in g[TRUTH_GROUP].attrs["placements"]], (300, 300))
        expected = [_brute_share(boxes.astype(np.float64), 2 * c, (76, 76)) for c in coords]
        np.testing.assert_allclose(g[truth_key("digit", "halo")][...], expected, atol=1e-6)
        default = g["grids/default/coords"][...]
        expected = [_brute_share(boxes.astype(np.float64), c, (50, 50)) for c in default]
        np.testing.assert_allclose(g[truth_key("digit")][...], expected, atol=1e-6)
    # train_warp warps the training canvases only: the same labels, validation and test pixel-identical
    warped = mm.make_megapixel_mnist(fake_mnist, tmp_path / "warped", 2, 1, 1, canvas=150, train_warp=1.0)
    assert [r["multilabel"] for r in _read_manifest(warped)] == [r["multilabel"] for r in rows]
    for row in rows:
        a = _open_complete(manifest.parent / row["path"])["0"][...]
        b = _open_complete(warped.parent / row["path"])["0"][...]
        assert np.array_equal(a, b) == (row["split"] != "train"), row["slide_id"]


@needs_writer
@pytest.mark.parametrize(("dims", "size", "patch"), [(2, 160, 32), (3, 48, 16)])
def test_lesion_dataset(tmp_path, dims, size, patch):
    manifest = les.make_lesion_dataset(tmp_path, 4, size, patch, seed=0, spatial_dims=dims)
    rows = _read_manifest(manifest)
    assert list(rows[0]) == ["slide_id", "path", "label", "split", "n_lesions"]
    assert sorted(r["label"] for r in rows) == ["0", "0", "1", "1"]
    from ips.data.manifest import read_manifest

    assert len(read_manifest(manifest, les.lesion_tasks())) == 4
    for i, row in enumerate(rows):
        g = _open_complete(manifest.parent / row["path"])
        attrs = g.attrs["ips"]
        assert attrs["spatial_dims"] == dims and g["0"].shape[1:] == (size,) * dims
        coords = g["grids/default/coords"][...]
        truth = g[f"{TRUTH_GROUP}/lesion"][...]
        assert truth.shape == (len(coords),)
        lesions = tuple(les.Lesion(tuple(x["center"]), x["radius"]) for x in g[TRUTH_GROUP].attrs["lesions"])
        assert int(row["label"]) == int(len(lesions) > 0) == g[TRUTH_GROUP].attrs["label"]
        assert int(row["n_lesions"]) == len(lesions)
        # the stored truth = the planted discs/spheres, patch by patch, and the image is the rendered one
        slide = les.render_lesion_slide(
            les.slide_rng(0, i), size, patch, positive=bool(int(row["label"])), spatial_dims=dims
        )
        assert slide.lesions == lesions
        np.testing.assert_array_equal(g["0"][...], slide.image)
        cells = patch_fraction(les.lesion_pixel_mask((size,) * dims, lesions), patch)
        np.testing.assert_allclose(truth, cells[tuple((coords // patch).T)])
        if lesions:
            assert (truth > 0).any()
        else:
            assert not truth.any()


# `ips synth KIND`: the command-line entries of the generators (the dataset rules are tested above)


def _synth(*argv: str) -> int:
    from ips.cli.main import main

    return main(["synth", *argv])


@needs_writer
def test_synth_lesions_passes_its_options_to_the_generator(tmp_path):
    out = tmp_path / "cli"
    argv = ["--n-slides", "4", "--size", "64", "--patch-size", "16", "--positive-fraction", "0.75"]
    assert _synth("lesions", "--out", str(out), *argv, "--seed", "3", "--quiet") == 0
    rows = _read_manifest(out / "manifest.csv")
    assert sorted(r["label"] for r in rows) == ["0", "1", "1", "1"]  # 3 of 4 positive, as asked
    for i, row in enumerate(rows):  # the stores hold the slides the rules draw for seed 3 at 64 px / 16 px
        slide = les.render_lesion_slide(les.slide_rng(3, i), 64, 16, positive=row["label"] == "1")
        np.testing.assert_array_equal(_open_complete(out / row["path"])["0"][...], slide.image)


@needs_writer
def test_synth_small_objects_and_annotate(tmp_path, capsys):
    out = tmp_path / "so"
    argv = [
        "--n-slides",
        "6",
        "--size",
        "128",
        "--patch-size",
        "16",
        "--distractors",
        "2",
        "3",
        "--max-object-fraction",
        "0.1",
    ]
    assert _synth("small-objects", "--out", str(out), *argv, "--split-fractions", "1", "0", "0") == 0
    assert "wrote 6 slides" in capsys.readouterr().out
    rows = _read_manifest(out / "manifest.csv")
    assert len(rows) == 6 and {r["split"] for r in rows} == {"train"}
    new = out / "annotated.csv"
    assert (
        _synth("annotate", "--manifest", str(out / "manifest.csv"), "--fraction", "1", "--out", str(new)) == 0
    )
    for row in _read_manifest(new):  # every training slide annotated: mask cell (r, c) = truth of that patch
        g = _open_complete(out / row["path"])
        mask = np.load(out / row["annotation"])
        coords = g["grids/default/coords"][...] // 16
        expected = np.zeros_like(mask)
        for (r, c), share in zip(coords, g[f"{TRUTH_GROUP}/lesion"][...], strict=True):
            expected[r, c] = share >= 0.25
        np.testing.assert_array_equal(mask, expected)
        assert mask.any() == (row["label"] == "1")
    assert (
        _synth("annotate", "--manifest", str(out / "manifest.csv"), "--fraction", "2", "--out", str(new)) == 2
    )


@needs_writer
def test_synth_megapixel_mnist_reads_the_csv(tmp_path, fake_mnist):
    import gzip

    images, labels = fake_mnist
    csv_path = tmp_path / "mnist.csv.gz"
    with gzip.open(csv_path, "wt") as f:
        for image, label in zip(images, labels, strict=True):
            f.write(",".join(map(str, [*image.reshape(-1), label])) + "\n")
    out = tmp_path / "mm"
    argv = [
        "--n-train",
        "2",
        "--n-val",
        "1",
        "--n-test",
        "1",
        "--canvas",
        "150",
        "--extra-grid",
        "halo:0:50:25",
    ]
    assert _synth("megapixel-mnist", "--mnist", str(csv_path), "--out", str(out), *argv, "--quiet") == 0
    rows = _read_manifest(out / "manifest.csv")
    assert [r["split"] for r in rows] == ["train", "train", "val", "test"]
    assert "halo" in _open_complete(out / rows[0]["path"])["grids"]
    bad = ["--mnist", str(csv_path), "--out", str(tmp_path / "bad"), "--extra-grid", "nonsense"]
    assert _synth("megapixel-mnist", *bad) == 2


def test_synth_refuses_a_bad_setting_in_one_line(tmp_path, capsys):
    assert _synth("lesions", "--out", str(tmp_path / "x"), "--size", "8", "--patch-size", "32") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ips synth lesions: ")
