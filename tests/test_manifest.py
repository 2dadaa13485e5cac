"""Manifest CSV: records, label parsing per task kind, and one clear error per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from ips.config import TaskConfig
from ips.data.manifest import ManifestError, SlideRecord, parse_label, read_manifest

BINARY = TaskConfig(name="tumor", kind="binary")
GRADE = TaskConfig(name="grade", kind="multiclass", num_classes=3, label_column="isup")
TAGS = TaskConfig(name="tags", kind="multilabel", num_classes=4)


def _write(tmp_path: Path, text: str, stores: tuple[str, ...] = ("a.zarr", "b.zarr", "c.zarr")) -> Path:
    for s in stores:
        (tmp_path / s).mkdir(exist_ok=True)
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_records_and_relative_paths(tmp_path):
    path = _write(tmp_path, "slide_id,path,tumor,split\na,a.zarr,1,train\nb,b.zarr,0,val\n")
    records = read_manifest(path, [BINARY])
    assert records == [
        SlideRecord("a", str(tmp_path / "a.zarr"), "train", {"tumor": 1}),
        SlideRecord("b", str(tmp_path / "b.zarr"), "val", {"tumor": 0}),
    ]


def test_absolute_paths_and_urls_kept(tmp_path):
    store = tmp_path / "a.zarr"
    path = _write(tmp_path, f"slide_id,path,tumor\na,{store},1\nb,s3://bucket/b.zarr,0\n")
    records = read_manifest(path, [BINARY])
    assert records[0].path == str(store) and records[1].path == "s3://bucket/b.zarr"


def test_split_filter(tmp_path):
    path = _write(tmp_path, "slide_id,path,tumor,split\na,a.zarr,1,train\nb,b.zarr,0,val\nc,c.zarr,0,train\n")
    assert [r.slide_id for r in read_manifest(path, [BINARY], split="train")] == ["a", "c"]
    assert [r.slide_id for r in read_manifest(path, [BINARY], split="test")] == []


def test_multi_task_labels(tmp_path):
    path = _write(
        tmp_path, 'slide_id,path,tumor,isup,tags\na,a.zarr,1,2,"3;0"\nb,b.zarr,0,0,\nc,c.zarr,0,1,1\n'
    )
    records = read_manifest(path, [BINARY, GRADE, TAGS])
    assert records[0].labels == {"tumor": 1, "grade": 2, "tags": (0, 3)}
    assert records[1].labels == {"tumor": 0, "grade": 0, "tags": ()}
    assert records[2].labels["tags"] == (1,)


def test_whitespace_and_bom(tmp_path):
    path = _write(tmp_path, "\ufeffslide_id , path ,tumor\n a , a.zarr , 1 \n")
    assert read_manifest(path, [BINARY])[0] == SlideRecord("a", str(tmp_path / "a.zarr"), None, {"tumor": 1})


@pytest.mark.parametrize(
    ("task", "text", "value"),
    [
        (BINARY, "0", 0),
        (BINARY, "1", 1),
        (GRADE, "2", 2),
        (TAGS, "", ()),
        (TAGS, "2;2;1", (1, 2)),
        (TAGS, " 3 ; 0 ", (0, 3)),
    ],
)
def test_parse_label(task, text, value):
    assert parse_label(text, task) == value


@pytest.mark.parametrize(
    ("task", "text"),
    [
        (BINARY, "2"),
        (BINARY, "yes"),
        (BINARY, ""),
        (BINARY, "0.5"),
        (GRADE, "3"),
        (GRADE, "-1"),
        (TAGS, "4"),
        (TAGS, "a;b"),
        (TAGS, "1;;2"),
    ],
)
def test_parse_label_rejects(task, text):
    with pytest.raises(ValueError):
        parse_label(text, task)


def _error(path: Path, tasks, **kw) -> str:
    with pytest.raises(ManifestError) as e:
        read_manifest(path, tasks, **kw)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_bad_label_names_row_and_column(tmp_path):
    path = _write(tmp_path, "slide_id,path,tumor,isup\na,a.zarr,1,0\nb,b.zarr,1,7\n")
    msg = _error(path, [BINARY, GRADE])
    assert "row 3" in msg and "'isup'" in msg and "7" in msg and "grade" in msg


def test_missing_label_column(tmp_path):
    msg = _error(_write(tmp_path, "slide_id,path,label\na,a.zarr,1\n"), [BINARY])
    assert "row 1" in msg and "missing column 'tumor'" in msg


@pytest.mark.parametrize("column", ["slide_id", "path"])
def test_missing_required_column(tmp_path, column):
    header = ",".join(c for c in ("slide_id", "path", "tumor") if c != column)
    msg = _error(_write(tmp_path, f"{header}\nx,1\n"), [BINARY])
    assert f"missing column {column!r}" in msg


def test_duplicate_slide_id(tmp_path):
    path = _write(tmp_path, "slide_id,path,tumor\na,a.zarr,1\nb,b.zarr,0\na,c.zarr,0\n")
    msg = _error(path, [BINARY])
    assert "row 4" in msg and "'slide_id'" in msg and "duplicate" in msg and "row 2" in msg


def test_missing_store(tmp_path):
    path = _write(tmp_path, "slide_id,path,tumor,split\na,a.zarr,1,train\nb,gone.zarr,0,val\n")
    msg = _error(path, [BINARY], split="train")  # checked even though the row is not in the split
    assert "row 3" in msg and "'path'" in msg and "gone.zarr" in msg and "does not exist" in msg
    assert len(read_manifest(path, [BINARY], check_paths=False)) == 2


def test_bad_split_values(tmp_path):
    path = _write(tmp_path, "slide_id,path,tumor,split\na,a.zarr,1,training\n")
    assert "'split'" in _error(path, [BINARY])
    assert "unknown split" in _error(path, [BINARY], split="dev")
    no_split = _write(tmp_path, "slide_id,path,tumor\na,a.zarr,1\n")
    assert "no 'split' column" in _error(no_split, [BINARY], split="train")


def test_structure_errors(tmp_path):
    assert "does not exist" in _error(tmp_path / "none.csv", [BINARY])
    assert "empty manifest" in _error(_write(tmp_path, ""), [BINARY])
    assert "extra" in _error(_write(tmp_path, "slide_id,path,tumor\na,a.zarr,1,9\n"), [BINARY])
    assert "empty slide_id" in _error(_write(tmp_path, "slide_id,path,tumor\n,a.zarr,1\n"), [BINARY])
    assert "empty path" in _error(_write(tmp_path, "slide_id,path,tumor\na,,1\n"), [BINARY])
    assert "duplicate columns" in _error(
        _write(tmp_path, "slide_id,path,tumor,tumor\na,a.zarr,1,1\n"), [BINARY]
    )


def test_labels_optional_for_prediction(tmp_path):
    path = _write(tmp_path, "slide_id,path,tumor\na,a.zarr,\nb,b.zarr,1\n")
    records = read_manifest(path, [BINARY, GRADE], require_labels=False)
    assert records[0].labels == {} and records[1].labels == {"tumor": 1}
    assert "bad label" in _error(path, [BINARY])  # an empty label is an error when labels are required


@pytest.mark.parametrize("slide_id", ["..", ".", "a/b", "..\\\\x", ".hidden", "../../etc"])
def test_a_slide_id_that_cannot_name_a_folder_is_refused(tmp_path, slide_id):
    """Heatmaps are written to DIR/<slide_id>/: a slide id must stay one folder inside DIR."""
    path = _write(tmp_path, f"slide_id,path,tumor\na,a.zarr,1\n{slide_id},b.zarr,0\n")
    message = _error(path, [BINARY])
    assert f"row 3, column 'slide_id': slide id {slide_id!r} cannot name a folder" in message


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_a_manifest_that_is_not_utf8_is_one_line_naming_the_row(tmp_path, encoding):
    for s in ("a.zarr", "b.zarr"):
        (tmp_path / s).mkdir()
    path = tmp_path / "manifest.csv"
    path.write_bytes("slide_id,path,tumor\na,a.zarr,1\nbé,b.zarr,0\n".encode(encoding))
    message = _error(path, [BINARY])
    row = "row 3" if encoding == "latin-1" else "row 1"  # UTF-16 fails at its byte-order mark
    assert message.startswith(f"{path}: {row}: not UTF-8 text (byte 0x") and "\n" not in message


def test_utf8_with_a_byte_order_mark_is_read(tmp_path):
    path = _write(tmp_path, "")
    path.write_bytes("slide_id,path,tumor\nbé,a.zarr,1\n".encode("utf-8-sig"))
    assert [r.slide_id for r in read_manifest(path, [BINARY])] == ["bé"]
