"""Annotations map onto the right grid patches: GeoJSON polygons and mask images, at level 0 and above."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from data_prep.convert import PrepOptions, convert_array
from ips.data.annotations import patch_labels
from ips.data.store import open_store
from ips.errors import ManifestError


def _store(tmp_path, level: int, patch: int = 16):
    """A 128 x 192 RGB image, full tissue; grid of `patch` px patches at `level` (downsample 2**level)."""
    image = np.full((3, 128, 192), 180, dtype=np.uint8)
    mask = np.ones((128, 192), dtype=bool)
    return convert_array(
        image,
        tmp_path,
        f"s{level}",
        mask=mask,
        options=PrepOptions(patch_size=patch, level=level, min_tissue=0.0),
    )


def _geojson(path, rings_xy):
    features = [
        {
            "type": "Feature",
            "properties": {"objectType": "annotation"},
            "geometry": {"type": "Polygon", "coordinates": rings},
        }
        for rings in rings_xy
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _expected(coords_l0: np.ndarray, size_l0: int, box_rc: tuple[int, int, int, int]) -> np.ndarray:
    """Exact fraction of each patch `[c, c + size)` inside the level-0 box (r0, c0, r1, c1)."""
    r0, c0, r1, c1 = box_rc
    dr = np.clip(np.minimum(coords_l0[:, 0] + size_l0, r1) - np.maximum(coords_l0[:, 0], r0), 0, None)
    dc = np.clip(np.minimum(coords_l0[:, 1] + size_l0, c1) - np.maximum(coords_l0[:, 1], c0), 0, None)
    return (dr * dc / size_l0**2).astype(np.float32)


@pytest.mark.parametrize("level", [0, 1])
def test_polygon_maps_onto_the_grid_patches(tmp_path, level):
    store = _store(tmp_path, level)
    coords_l0 = open_store(store).coords("default").astype(np.int64) * 2**level
    size_l0 = 16 * 2**level
    # a rectangle in level-0 (x, y): rows 32..96, cols 64..128 (aligned to 32 px: whole level-1 patches)
    box = (32, 64, 96, 128)
    ann = _geojson(tmp_path / "a.geojson", [[[[64, 32], [128, 32], [128, 96], [64, 96], [64, 32]]]])
    labels = patch_labels(ann, store, "default")
    np.testing.assert_allclose(labels.dense(), _expected(coords_l0, size_l0, box), atol=1 / 32)
    inside = _expected(coords_l0, size_l0, box) == 1
    assert set(labels.positives()) == set(np.flatnonzero(inside))


def test_polygon_hole_and_partial_patches(tmp_path):
    store = _store(tmp_path, 0)
    coords = open_store(store).coords("default").astype(np.int64)
    outer = [[0, 0], [64, 0], [64, 64], [0, 64], [0, 0]]
    hole = [[16, 16], [32, 16], [32, 32], [16, 32], [16, 16]]  # exactly one 16-px patch: (16, 16)
    half = [[[96, 0], [104, 0], [104, 16], [96, 16], [96, 0]]]  # half of patch (0, 96)
    labels = patch_labels(_geojson(tmp_path / "a.geojson", [[outer, hole], half]), store, "default")
    dense = labels.dense()

    def at(r, c):
        return dense[np.flatnonzero((coords[:, 0] == r) & (coords[:, 1] == c))[0]]

    assert at(0, 0) == 1 and at(48, 48) == 1 and at(16, 16) == 0 and at(64, 64) == 0
    assert at(0, 96) == pytest.approx(0.5, abs=1 / 16)


@pytest.mark.parametrize("suffix", [".npy", ".tif", ".png"])
def test_mask_image_at_its_own_scale(tmp_path, suffix):
    store = _store(tmp_path, 1)
    coords_l0 = open_store(store).coords("default").astype(np.int64) * 2
    mask = np.zeros((32, 48), dtype=np.uint8)  # level 0 / 4
    mask[8:24, 16:32] = 255  # level-0 rows 32..96, cols 64..128
    path = tmp_path / f"m{suffix}"
    if suffix == ".npy":
        np.save(path, mask)
    elif suffix == ".tif":
        tifffile.imwrite(path, mask)
    else:
        from PIL import Image

        Image.fromarray(mask).save(path)
    labels = patch_labels(path, store, "default")
    np.testing.assert_allclose(labels.dense(), _expected(coords_l0, 32, (32, 64, 96, 128)), atol=1e-6)


def test_labels_of_selected_patches(tmp_path):
    store = _store(tmp_path, 0)
    labels = patch_labels(
        _geojson(tmp_path / "a.geojson", [[[[0, 0], [32, 0], [32, 16], [0, 16], [0, 0]]]]), store, "default"
    )
    dense = labels.dense()
    pick = np.array([0, 1, 2, 5, len(dense) - 1])
    np.testing.assert_array_equal(labels.of(pick), dense[pick])


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("a.geojson", "{not json", "not valid JSON"),
        ("a.geojson", json.dumps({"type": "FeatureCollection", "features": []}), "no Polygon"),
        ("a.txt", "x", "unknown kind '.txt'"),
    ],
)
def test_bad_annotations_fail_naming_the_file(tmp_path, name, text, match):
    store = _store(tmp_path, 0)
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ManifestError, match=match) as e:
        patch_labels(path, store, "default")
    assert str(path) in str(e.value)
    with pytest.raises(ManifestError, match="does not exist"):
        patch_labels(tmp_path / "missing.geojson", store, "default")


# --- training with annotations ------------------------------------------------------------------------


def test_annotation_loss_is_zero_for_unannotated_slides():
    import torch

    from ips.training.step import annotation_loss

    attn = torch.randn(3, 2, 4, 5, requires_grad=True)  # (B, T, H, M)
    targets = torch.full((3, 5), float("nan"))
    targets[1, :3] = torch.tensor([1.0, 0.0, 0.5])
    mask = torch.ones(3, 5, dtype=torch.bool)
    loss = annotation_loss(attn, targets, mask)
    assert loss[0].item() == 0.0 and loss[2].item() == 0.0 and loss[1].item() > 0
    loss.sum().backward()
    assert torch.all(attn.grad[[0, 2]] == 0) and torch.any(attn.grad[1] != 0)
    # the loss of slide 1 is the mean BCE over its 3 annotated patches of the mean over tasks and heads
    scores = attn.detach().mean(dim=(1, 2))[1, :3]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(scores, targets[1, :3])
    assert loss[1].item() == pytest.approx(expected.item(), rel=1e-6)


def test_unannotated_batch_trains_exactly_as_before():
    """Gradients with patch targets that are all NaN (no slide annotated) equal those without any."""
    import torch

    from ips.algo.batch import SelectedBatch
    from ips.config import ModelConfig, TaskConfig
    from ips.model import build_model
    from ips.training.step import accumulate_gradients

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            encoder="ips_cnn_tiny",
            in_chans=1,
            patch_size=8,
            d_model=16,
            n_heads=2,
            d_mlp=16,
            tasks=(TaskConfig(),),
        )
    )
    batch = SelectedBatch(
        torch.randint(0, 255, (2, 4, 1, 8, 8), dtype=torch.uint8),
        torch.rand(2, 4, 2),
        torch.ones(2, 4, dtype=torch.bool),
        {"label": torch.tensor([0, 1])},
    )
    grads = []
    for patch_targets in (None, torch.full((2, 4), float("nan"))):
        model.zero_grad()
        batch.patch_targets = patch_targets
        accumulate_gradients(model, batch, model.tasks, micro_batch_size=1, annotation_weight=1.0)
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_guided_selection_puts_annotated_patches_in_the_slots():
    import torch

    from ips.algo.selection import Selection, guide_selection
    from ips.data.sources import InMemoryPatchSource

    n, m = 50, 8
    source = InMemoryPatchSource(
        torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).clone(),
        np.zeros((n, 2), dtype=np.float32),
    )
    sel = Selection(torch.arange(m), torch.linspace(1, 0, m), source.read(np.arange(m)), torch.zeros(m, 2))
    candidates = np.array([3, 20, 21, 22, 40])
    out = guide_selection(
        sel, source, candidates=candidates, fraction=0.5, generator=np.random.default_rng(0)
    )
    idx = out.indices.numpy()
    assert len(idx) == m and len(set(idx)) == m
    assert np.isin(idx, candidates).sum() == 4  # round(0.5 * 8): patch 3 (already in) + 3 drawn
    assert set(idx[:4]) == {0, 1, 2, 3}  # the best-scoring patches stay; the lowest unannotated go
    assert torch.equal(
        out.patches[:, 0, 0, 0], torch.as_tensor(idx, dtype=torch.uint8)
    )  # read from the source


def test_manifest_annotation_column(tmp_path):
    from train_fixtures import make_cross_slides

    from ips.config import TaskConfig
    from ips.data.manifest import read_manifest

    manifest = make_cross_slides(tmp_path, n_train=8, n_val=2, annotate=1.0)
    records = read_manifest(manifest, (TaskConfig(),))
    annotated = [r for r in records if r.annotation]
    assert annotated and all(r.labels["label"] == 1 and r.split == "train" for r in annotated)
    assert all(r.annotation == str(tmp_path / f"{r.slide_id}.truth.npy") for r in annotated)
    assert all(r.annotation is None for r in records if r.labels["label"] == 0)
    text = manifest.read_text().replace(f"{annotated[0].slide_id}.truth.npy", "gone.npy")
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(ManifestError, match=r"column 'annotation': annotation .*gone.npy does not exist"):
        read_manifest(tmp_path / "bad.csv", (TaskConfig(),))


@pytest.mark.slow
@pytest.mark.learning
def test_annotations_make_a_stalled_task_learn(tmp_path):
    """The cross task at seed 1, marks annotated on every positive training slide, no exploration, against
    a control: the same run on the same slides with the annotation column removed. Measured (val accuracy
    over 15 epochs): guidance off 0.5 throughout; slots only: 1.0 from epoch 11; loss only, and both (the
    defaults): 1.0 from epoch 4. Asserted: guided >= 0.8, control <= 0.6 (chance 0.5 on 12 slides)."""
    import csv

    from train_fixtures import TINY, make_cross_slides, tiny_config

    from ips.training.loop import train

    manifest = make_cross_slides(tmp_path / "data", n_train=24, n_val=12, seed=1, mark="cross", annotate=1.0)
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sum(1 for r in rows if r["annotation"]) > 0
    control = manifest.with_name("no_annotations.csv")  # same folder: same relative store paths
    with control.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "annotation"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    cfg = tiny_config(
        model={**TINY["model"], "encoder": "ips_cnn_small"},
        selection={"memory_size": 8},
        train={"epochs": 15, "batch_size": 4, "lr": 3e-3, "warmup_epochs": 1, "seed": 1},
        data={"augment": True, "color_jitter": 0.0},
    )
    accuracy = {}
    for name, m in (("guided", manifest), ("control", control)):
        lines: list[str] = []
        result = train(cfg, manifest=m, run_dir=tmp_path / name, show_progress=False, log=lines.append)
        assert any("training slides are annotated" in line for line in lines) == (name == "guided"), lines
        accuracy[name] = [r["val_label/accuracy"] for r in result.history]
    assert accuracy["guided"][-1] >= 0.8 and accuracy["control"][-1] <= 0.6, accuracy


# --- annotations that cannot be right are refused at load, in one line naming the file and the slide -----


def _polygon_file(tmp_path, geometry) -> object:
    path = tmp_path / "bad.geojson"
    feature = {"type": "Feature", "properties": {}, "geometry": geometry}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return path


SQUARE = [[0, 0], [32, 0], [32, 32], [0, 32], [0, 0]]  # inside the 192 x 128 slide


@pytest.mark.parametrize(
    ("geometry", "match"),
    [
        (
            {"type": "Polygon", "coordinates": [[[5000, 5000], [5100, 5000], [5100, 5100], [5000, 5000]]]},
            "outside",
        ),
        ({"type": "Polygon", "coordinates": [[[-50, -50], [-10, -50], [-10, -10], [-50, -50]]]}, "outside"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [float("nan"), 5], [9, 9], [0, 0]]]}, "NaN"),
        ({"type": "Polygon", "coordinates": [[[10, 10]]]}, "encloses no area"),
        (
            {"type": "Polygon", "coordinates": [[[0, 0, 1], [32, 0, 1], [32, 32, 1], [0, 0, 1]]]},
            "3 coordinates",
        ),
        ({"type": "Polygon", "coordinates": None}, "not a list of rings"),
        ({"type": "Polygon", "coordinates": [0, 0, 32, 0, 32, 32]}, "not a list of rings"),
        (
            {"type": "Polygon", "coordinates": [[["0", "0"], ["32", "0"], ["32", "32"]]]},
            "not a pair of numbers",
        ),
        ({"type": "Polygon", "coordinates": [[]]}, "empty"),
        ({"type": "Polygon", "coordinates": []}, "not a list of rings"),
        ({"type": "MultiPolygon", "coordinates": [SQUARE]}, "not a list of rings|not a pair of numbers"),
        ({"type": "MultiPolygon", "coordinates": [[[1, 2]]]}, "not a pair of numbers|not a list"),
        ({"type": "MultiPolygon", "coordinates": 7}, "not a list of rings"),
    ],
)
def test_polygons_that_cannot_be_right_are_one_line_errors(tmp_path, geometry, match):
    store = _store(tmp_path, 0)
    path = _polygon_file(tmp_path, geometry)
    with pytest.raises(ManifestError, match=match) as e:
        patch_labels(path, store, "default", slide="s0")
    text = str(e.value)
    assert f"annotation {path} of slide s0: " in text and "\n" not in text


def test_a_polygon_between_the_patches_touches_none_and_is_an_error(tmp_path):
    """Inside the slide but over no patch of the grid (a tissue grid skips background): an error."""
    image = np.full((3, 128, 192), 180, dtype=np.uint8)
    tissue = np.zeros((128, 192), dtype=bool)
    tissue[:, :96] = True  # the grid covers the left half only
    store = convert_array(
        image, tmp_path, "half", mask=tissue, options=PrepOptions(patch_size=16, min_tissue=0.5)
    )
    right = [[[150, 40], [180, 40], [180, 80], [150, 80], [150, 40]]]
    with pytest.raises(ManifestError, match=r"of slide half: its polygons touch none of the \d+ patches"):
        patch_labels(_geojson(tmp_path / "r.geojson", [right]), store, "default", slide="half")
    left = [[[10, 10], [40, 10], [40, 40], [10, 40], [10, 10]]]
    assert patch_labels(_geojson(tmp_path / "l.geojson", [left]), store, "default").indices.size > 0


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((10, 1000), "not the slide .* at one scale"),
        ((1000, 10), "not the slide .* at one scale"),
        ((1, 1), "coarser than a patch"),
        ((4, 128, 192), "expected 2 spatial dimensions"),
        ((256, 384), "larger than the slide"),
        ((128, 191 + 8), "not the slide .* at one scale"),
    ],
)
def test_masks_of_another_size_are_refused_not_stretched(tmp_path, shape, match):
    store = _store(tmp_path, 0)  # level 0: 128 x 192, patches of 16
    path = tmp_path / "m.npy"
    np.save(path, np.ones(shape, dtype=np.uint8))
    with pytest.raises(ManifestError, match=match) as e:
        patch_labels(path, store, "default", slide="s0")
    assert f"annotation {path} of slide s0: " in str(e.value)


@pytest.mark.parametrize("shape", [(128, 192), (64, 96), (32, 48), (16, 24), (65, 96), (128, 192, 3)])
def test_masks_at_one_scale_of_the_slide_are_taken(tmp_path, shape):
    store = _store(tmp_path, 0)
    path = tmp_path / "m.npy"
    np.save(path, np.ones(shape, dtype=np.uint8))
    labels = patch_labels(path, store, "default")
    assert labels.indices.size == labels.n_patches and np.all(labels.fractions > 0.99)


def test_a_huge_png_is_one_line_without_decoding_it(tmp_path):
    """A 30000 x 30000 PNG (PIL's bomb limit would raise DecompressionBombError) for a small slide."""
    from PIL import Image

    store = _store(tmp_path, 0)
    path = tmp_path / "huge.png"
    Image.new("1", (30000, 30000)).save(path, optimize=False)  # 1-bit, compresses to ~100 kB
    assert path.stat().st_size < 2_000_000  # a small file that would decode to 900 M pixels
    with pytest.raises(ManifestError, match=r"mask size 30000 x 30000 is (larger than|not) the slide"):
        patch_labels(path, store, "default", slide="s0")


def test_a_damaged_mask_file_is_one_line(tmp_path):
    store = _store(tmp_path, 0)
    path = tmp_path / "m.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ManifestError, match=r"cannot read the mask") as e:
        patch_labels(path, store, "default", slide="s0")
    assert "\n" not in str(e.value)
