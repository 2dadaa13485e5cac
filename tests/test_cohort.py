"""`ips manifest`: stores + labels -> a manifest with stratified, grouped, seeded splits; and the
manifest reader refusing one store under two ids (two rows, or two splits)."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ips.cli.main import main
from ips.config import TaskConfig
from ips.data.cohort import CohortPlan, assign_splits, build_manifest, parse_fractions
from ips.data.manifest import read_manifest
from ips.errors import ManifestError

SPLITS = ("train", "val", "test")


def _cohort(root: Path, labels: dict[str, dict[str, str]]) -> tuple[list[str], Path]:
    """Empty store folders `root/stores/<id>.zarr` and `root/labels.csv` with the given columns."""
    stores = []
    for sid in labels:
        store = root / "stores" / f"{sid}.zarr"
        store.mkdir(parents=True, exist_ok=True)
        (store / "ips_complete.json").write_text("{}")  # what the reader here looks for: the marker
        stores.append(str(store))
    columns = ["slide_id", *next(iter(labels.values()))]
    path = root / "labels.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for sid, row in labels.items():
            w.writerow({"slide_id": sid, **row})
    return stores, path


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_stratified_counts_are_exact_when_the_fractions_divide():
    """20 negatives and 10 positives at 0.6/0.2/0.2: exactly 12/4/4 and 6/2/2, at every seed."""
    strata = ["0"] * 20 + ["1"] * 10
    ids = [f"s{i}" for i in range(30)]
    for seed in range(5):
        splits = assign_splits(strata, ids, [""] * 30, CohortPlan(seed=seed))
        counts = Counter(zip(strata, splits, strict=True))
        assert [counts["0", s] for s in SPLITS] == [12, 4, 4]
        assert [counts["1", s] for s in SPLITS] == [6, 2, 2]


@pytest.mark.parametrize(
    ("n0", "n1", "fractions"), [(7, 3, (0.6, 0.2, 0.2)), (11, 5, (0.5, 0.3, 0.2)), (4, 1, (0.7, 0.3, 0.0))]
)
def test_every_split_is_within_one_slide_of_its_share_of_each_stratum(n0, n1, fractions):
    strata = ["neg"] * n0 + ["pos"] * n1
    for seed in range(5):
        splits = assign_splits(
            strata, [str(i) for i in range(n0 + n1)], [""] * (n0 + n1), CohortPlan(fractions, seed=seed)
        )
        for stratum, n in (("neg", n0), ("pos", n1)):
            for split, f in zip(SPLITS, fractions, strict=True):
                got = sum(1 for s, x in zip(strata, splits, strict=True) if s == stratum and x == split)
                assert abs(got - f * n) < 1, (stratum, split, got, f * n)
        if fractions[2] == 0:
            assert "test" not in splits


def test_a_patient_never_spans_two_splits_and_the_splits_are_not_empty():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, size=15)  # 15 patients with 1-5 slides each
    groups = [f"p{p}" for p, k in enumerate(sizes) for _ in range(k)]
    strata = [str(rng.integers(0, 2)) for _ in groups]
    for seed in range(10):
        splits = assign_splits(strata, groups, [""] * len(groups), CohortPlan(seed=seed))
        per_patient = {g: {s for gg, s in zip(groups, splits, strict=True) if gg == g} for g in groups}
        assert all(len(v) == 1 for v in per_patient.values())
        assert set(splits) == set(SPLITS)


def test_fixed_splits_are_kept_with_their_group():
    groups = ["a", "a", "b", "c", "d", "e", "f", "g"]
    fixed = ["test", "", "", "", "", "val", "", ""]
    splits = assign_splits(["x"] * 8, groups, fixed, CohortPlan())
    assert splits[0] == splits[1] == "test" and splits[5] == "val"
    with pytest.raises(ManifestError, match="group 'a' has slides fixed to two splits"):
        assign_splits(["x"] * 2, ["a", "a"], ["test", "train"], CohortPlan())


def test_the_same_seed_gives_the_same_manifest_and_another_seed_another(tmp_path):
    labels = {f"s{i:02d}": {"label": str(i % 3 == 0), "patient": f"p{i // 2}"} for i in range(24)}
    stores, path = _cohort(tmp_path, labels)
    plan = CohortPlan(group_by="patient", seed=3)
    first = build_manifest(stores, path, plan)
    assert build_manifest(stores, path, plan) == first
    assert build_manifest(list(reversed(stores)), path, plan) == list(reversed(first))  # not the order
    others = [build_manifest(stores, path, CohortPlan(group_by="patient", seed=s)) for s in range(4, 9)]
    assert any(o != first for o in others)


def test_cli_writes_the_contract_columns_and_keeps_the_other_label_columns(tmp_path, capsys):
    labels = {
        f"s{i}": {
            "label": str(i % 2),
            "patient": f"p{i // 2}",
            "time": f"{10 + i}.5",
            "event": str(i % 3 == 0),
        }
        for i in range(10)
    }
    stores, path = _cohort(tmp_path, labels)
    out = tmp_path / "manifest.csv"
    assert main(["manifest", *stores, "--labels", str(path), "--out", str(out), "--group-by", "patient"]) == 0
    rows = _read(out)
    assert list(rows[0]) == ["slide_id", "path", "label", "patient", "time", "event", "split"]
    assert [r["slide_id"] for r in rows] == list(labels)
    assert all(r["path"] == f"stores/{r['slide_id']}.zarr" for r in rows)  # relative to the manifest
    assert rows[3]["time"] == "13.5" and rows[3]["event"] == "True"
    assert "10 slides (train " in capsys.readouterr().out
    records = read_manifest(out, [TaskConfig(name="label", kind="binary")])
    assert [r.path for r in records] == [str(tmp_path / "stores" / f"{s}.zarr") for s in labels]
    assert {r.split for r in records} <= set(SPLITS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("store_twice", "is given twice"),
        ("same_id", "two stores have the slide id 's0'"),
        ("no_label", "no label row for 1 store"),
        ("no_store", "labelled slide.* have no store: 's3'"),
        ("label_twice", "row 3: slide 's0' is listed twice"),
        ("missing_store", "does not exist"),
        ("incomplete_store", "is not complete \\(no ips_complete.json\\)"),
        ("no_group_column", "no column 'patient'"),
    ],
)
def test_bad_inputs_are_one_line_errors_with_exit_2(tmp_path, capsys, change, message):
    labels = {f"s{i}": {"label": str(i % 2), "patient": f"p{i}"} for i in range(4)}
    stores, path = _cohort(tmp_path, labels)
    extra = []
    if change == "store_twice":
        stores.append(str(Path(stores[0]).parent / "." / "s0.zarr"))
    elif change == "same_id":
        other = tmp_path / "elsewhere" / "s0.zarr"
        other.mkdir(parents=True)
        (other / "ips_complete.json").write_text("{}")
        stores.append(str(other))
    elif change == "no_label":
        (tmp_path / "stores" / "s9.zarr").mkdir()
        (tmp_path / "stores" / "s9.zarr" / "ips_complete.json").write_text("{}")
        stores.append(str(tmp_path / "stores" / "s9.zarr"))
    elif change == "no_store":
        stores.remove(str(tmp_path / "stores" / "s3.zarr"))
    elif change == "label_twice":
        path.write_text(path.read_text() + "s0,1,p0\n")
        lines = path.read_text().splitlines()
        path.write_text("\n".join([lines[0], lines[1], lines[-1], *lines[2:-1]]) + "\n")
    elif change == "missing_store":
        stores.append(str(tmp_path / "nowhere.zarr"))
    elif change == "incomplete_store":
        (Path(stores[1]) / "ips_complete.json").unlink()
    elif change == "no_group_column":
        extra = ["--group-by", "patient"]
        path.write_text(path.read_text().replace("patient", "case"))
    out = tmp_path / "m.csv"
    assert main(["manifest", *stores, "--labels", str(path), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ips manifest: ")
    import re

    assert re.search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize("text", ["0.5,0.5,0.5", "a,b,c", "0.6,0.2,0.1,0.1", "-0.2,0.6,0.6"])
def test_bad_fractions(text):
    with pytest.raises(ManifestError, match="--split"):
        CohortPlan(parse_fractions(text))


def test_two_fractions_mean_no_test_split():
    assert parse_fractions("0.8,0.2") == (0.8, 0.2, 0.0)


# -- reading a manifest: one store under two ids ------------------------------------------------------


BINARY = TaskConfig(name="tumor", kind="binary")


def test_reading_refuses_a_store_under_two_ids_in_one_split(tmp_path):
    (tmp_path / "a.zarr").mkdir()
    path = tmp_path / "m.csv"
    path.write_text(f"slide_id,path,tumor,split\na,a.zarr,1,train\nb,{tmp_path / 'a.zarr'},1,train\n")
    with pytest.raises(
        ManifestError, match=r"row 3, column 'path': store .* is listed twice: as 'a' \(row 2\)"
    ):
        read_manifest(path, [BINARY])


def test_reading_refuses_a_store_in_two_splits_whatever_split_is_asked(tmp_path):
    (tmp_path / "a.zarr").mkdir()
    (tmp_path / "c.zarr").mkdir()
    path = tmp_path / "m.csv"
    path.write_text("slide_id,path,tumor,split\na,a.zarr,1,train\nc,c.zarr,0,val\nb,./a.zarr/,1,test\n")
    for split in (None, "val"):
        with pytest.raises(ManifestError, match=r"row 4.*listed in two splits \(train and test\)"):
            read_manifest(path, [BINARY], split)


def test_reading_refuses_one_url_twice(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("slide_id,path,tumor\na,s3://b/a.zarr,1\nb,s3://b/a.zarr/,1\n")
    with pytest.raises(ManifestError, match="listed twice"):
        read_manifest(path, [BINARY])
