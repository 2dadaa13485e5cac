"""The slide manifest: a CSV of `slide_id,path,<label columns>[,split]`, validated before training.

`path` is a store made by `ips prep` (relative paths are resolved against the manifest's folder; URLs
are kept as they are). One label column per task (`TaskConfig.column`). Labels:

- `binary`: `0` or `1`;
- `multiclass`: an integer in `[0, num_classes)`;
- `multilabel`: `;`-separated class indices in `[0, num_classes)`, possibly empty (no class);
- `ordinal`: an integer in `[0, num_classes)`;
- `regression`: a finite number;
- `survival`: two columns, `time` (a finite number >= 0: time to the event or to censoring) and `event`
  (`1` the event was observed, `0` censored); the task's `label_column` / `event_column` rename them.

Optional `annotation`: a QuPath GeoJSON or mask image of the slide's region of interest (relative to
the manifest's folder), for patch-level guidance in training (`ips.data.annotations`); empty = none.

Every problem (a missing column, a bad label, a duplicate slide_id, a missing store, an unknown split,
one store listed under two slide ids, which also catches one store in two splits) is a `ManifestError` naming the file, the row (counted as a spreadsheet does: the header is row 1) and
the column, raised when the manifest is read (every row is checked, whatever split is asked for).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ips.config import TaskConfig
from ips.errors import ManifestError

SPLITS = ("train", "val", "test")
REQUIRED = ("slide_id", "path")
ANNOTATION_COLUMN = "annotation"  # optional: per-slide annotation file (patch-level guidance)

Label = int | float | tuple[int, ...] | tuple[float, int]


@dataclass(frozen=True)
class SlideRecord:
    """One manifest row: `labels` maps task name -> int (binary, multiclass, ordinal), tuple of class
    indices (multilabel), float (regression) or `(time, event)` (survival); a task whose label is
    unknown (allowed only with `require_labels=False`) is absent."""

    slide_id: str
    path: str
    split: str | None = None
    labels: dict[str, Label] = field(default_factory=dict)
    annotation: str | None = None  # the optional `annotation` column: GeoJSON or mask (ips.data.annotations)


def parse_label(text: str, task: TaskConfig) -> Label:
    """The label of `task` written as `text`; ValueError with the reason if it is not valid."""
    text = text.strip()
    if task.kind == "regression":
        return _finite(text)
    if task.kind == "multilabel":
        parts = [p.strip() for p in text.split(";")] if text else []
        values = []
        for p in parts:
            if not p.lstrip("-").isdigit():
                raise ValueError(f"{p!r} is not a class index (multilabel: ';'-separated integers)")
            values.append(int(p))
        bad = [v for v in values if not 0 <= v < task.num_classes]
        if bad:
            raise ValueError(f"class indices {bad} are outside [0, {task.num_classes})")
        return tuple(sorted(set(values)))
    if not text.lstrip("-").isdigit():
        raise ValueError(f"{text!r} is not an integer")
    value = int(text)
    if task.kind == "binary" and value not in (0, 1):
        raise ValueError(f"{value} is not 0 or 1 (binary task)")
    if task.kind in ("multiclass", "ordinal") and not 0 <= value < task.num_classes:
        raise ValueError(f"{value} is outside [0, {task.num_classes}) ({task.kind} task)")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def parse_survival(time_text: str, event_text: str) -> tuple[float, int]:
    """`(time, event)` of a survival task from its two cells; ValueError naming the bad one."""
    time = _finite(time_text.strip())
    if time < 0:
        raise ValueError(f"time {time:g} is negative")
    if event_text.strip() not in ("0", "1"):
        raise ValueError(f"event {event_text.strip()!r} is not 0 (censored) or 1 (event)")
    return time, int(event_text.strip())


def label_cells(task: TaskConfig, label: Label) -> dict[str, str]:
    """The manifest cells `{column: text}` of a task's label (the inverse of reading them)."""
    if task.kind == "survival":
        time, event = label  # type: ignore[misc]
        return dict(zip(task.columns, (repr(float(time)), str(int(event)))))
    if task.kind == "regression":
        return {task.column: repr(float(label))}  # type: ignore[arg-type]  # shortest exact text
    if isinstance(label, (list, tuple)):
        return {task.column: ";".join(str(v) for v in label)}
    return {task.column: str(label)}


def _is_number(text: str) -> bool:
    """Whether `text` is a valid survival time (to tell which of the two cells is bad)."""
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and value >= 0


def _annotation(
    cell: str, folder: Path, check_paths: bool, fail: Callable[[str, str], ManifestError]
) -> str | None:
    """The annotation file of a row (relative to the manifest's folder), or None for an empty cell."""
    if not cell:
        return None
    path = Path(cell) if Path(cell).is_absolute() else folder / cell
    if check_paths and not path.is_file():
        raise fail(ANNOTATION_COLUMN, f"annotation {path} does not exist")
    return str(path)


def safe_slide_id(slide_id: str, where: str) -> str:
    """`slide_id` when it can name a folder (heatmaps write `DIR/<slide_id>/`, prep `DIR/<slide_id>.zarr`):
    one path component, not `.` or `..`, not hidden; ManifestError naming `where` otherwise."""
    bad = (
        not slide_id
        or slide_id.startswith(".")
        or any(c in slide_id for c in "/\\\0")
        or slide_id != slide_id.strip()
    )
    if bad:
        raise ManifestError(
            f"{where}: slide id {slide_id!r} cannot name a folder (empty, a path, or starting with '.'); "
            "rename it"
        )
    return slide_id


def resolve_path(path: str, folder: Path) -> tuple[str, bool]:
    """(resolved path, is local): URLs are kept; relative local paths are joined to `folder`."""
    if "://" in path:
        return path, False
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (folder / p)), True


def _read_text(path: Path) -> str:
    """The manifest's text (UTF-8, a byte-order mark allowed); ManifestError naming the row of the first
    byte that is not UTF-8 (a spreadsheet's Latin-1 or UTF-16 export) or what the OS said."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        row = raw.count(b"\n", 0, e.start) + 1
        raise ManifestError(
            f"{path}: row {row}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the "
            "manifest as UTF-8 CSV"
        ) from None


def read_manifest(
    path: str | Path,
    tasks: Sequence[TaskConfig],
    split: str | None = None,
    *,
    require_labels: bool = True,
    check_paths: bool = True,
) -> list[SlideRecord]:
    """Read and validate the manifest at `path`; keep only rows of `split` when given.

    `require_labels=False` (prediction) allows missing label columns and empty label cells
    (binary/multiclass); such labels are left out of `SlideRecord.labels`. `check_paths` checks that
    local store paths exist.
    """
    path = Path(path)
    if split is not None and split not in SPLITS:
        raise ManifestError(f"{path}: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file does not exist")
    with io.StringIO(_read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not header:
            raise ManifestError(f"{path}: empty manifest (expected a header row with slide_id,path,...)")
        reader.fieldnames = header
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise ManifestError(f"{path}: row 1 (header): duplicate columns {dup}")
        needed = list(REQUIRED) + ([c for t in tasks for c in t.columns] if require_labels else [])
        missing = [c for c in needed if c not in header]
        if missing:
            raise ManifestError(
                f"{path}: row 1 (header): missing column {missing[0]!r} (columns: {', '.join(header)})"
            )
        if split is not None and "split" not in header:
            raise ManifestError(
                f"{path}: row 1 (header): no 'split' column, but split {split!r} was asked for"
            )
        records: list[SlideRecord] = []
        seen: dict[str, int] = {}
        stores: dict[str, tuple[str, int, str | None]] = {}  # store -> (slide_id, row, split)
        folder = path.parent
        for row in reader:
            line = reader.line_num

            def fail(column: str, msg: str, line: int = line) -> ManifestError:
                return ManifestError(f"{path}: row {line}, column {column!r}: {msg}")

            if None in row:  # more cells than header columns
                raise fail("<extra>", f"{len(header) + len(row[None])} cells but {len(header)} columns")
            cells = {k: (v or "").strip() for k, v in row.items()}
            slide_id = cells["slide_id"]
            if not slide_id:
                raise fail("slide_id", "empty slide_id")
            try:
                safe_slide_id(slide_id, "slide_id")
            except ManifestError as e:
                raise fail("slide_id", str(e).split(": ", 1)[1]) from None
            if slide_id in seen:
                raise fail("slide_id", f"duplicate slide_id {slide_id!r} (first at row {seen[slide_id]})")
            seen[slide_id] = line
            if not cells["path"]:
                raise fail("path", "empty path")
            store, local = resolve_path(cells["path"], folder)
            row_split = cells.get("split") or None
            if row_split is not None and row_split not in SPLITS:
                raise fail("split", f"unknown split {row_split!r}; valid splits: {', '.join(SPLITS)}")
            # a store under two ids is one slide counted twice; in two splits it leaks test into train:
            # refused (not warned), since no manifest needs it and either one silently biases the metrics
            key = str(Path(store).resolve()) if local else store.rstrip("/")
            if key in stores:
                other, other_line, other_split = stores[key]
                where = (
                    f"in two splits ({other_split or '-'} and {row_split or '-'})"
                    if other_split != row_split
                    else "twice"
                )
                raise fail(
                    "path",
                    f"store {cells['path']} is listed {where}: as {other!r} (row {other_line}) and as "
                    f"{slide_id!r}; one row per slide",
                )
            stores[key] = (slide_id, line, row_split)
            labels: dict[str, Label] = {}
            for task in tasks:
                col = task.column
                text = cells.get(col)
                if text is None or (not text and not require_labels and task.kind != "multilabel"):
                    continue
                try:
                    if task.kind == "survival":
                        event = cells.get(task.columns[1])
                        if event is None or (not event and not require_labels):
                            continue
                        col = task.columns[0] if not _is_number(text) else task.columns[1]
                        labels[task.name] = parse_survival(text, event)
                    else:
                        labels[task.name] = parse_label(text, task)
                except ValueError as e:
                    raise fail(col, f"bad label for task {task.name!r}: {e}") from None
            # every row is checked, whatever the split asked for: a bad val row fails before training
            if check_paths and local and not Path(store).exists():
                raise fail("path", f"store {store} does not exist")
            annotation = _annotation(cells.get(ANNOTATION_COLUMN, ""), folder, check_paths, fail)
            if split is not None and row_split != split:
                continue
            records.append(SlideRecord(slide_id, store, row_split, labels, annotation))
    return records
