"""Adapters that read each benchmark's annotation file into `RawRecord`s.

Every supported source keeps its images under `<root>/imgs/` and describes them in
one JSON list of records (`split`, `captions`, an image path, `id`). A record whose
structure is wrong becomes a `Problem` instead of a `RawRecord`. Input that cannot
be read at all raises `UnusableInput`.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.data.canonical import SPLITS, RawRecord

FORMATS = ("synthpedes", "cuhk-pedes", "icfg-pedes", "rstpreid")
IMAGE_DIR = "imgs"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data set, located precisely enough to fix it."""

    file: str  # the annotation or image file concerned
    record: int | None  # index in the annotation list, None for the file as a whole
    kind: str  # short slug, e.g. "missing-image"
    message: str
    # the record's image path as the annotation file spells it (when it has a usable one), so that a
    # record of a long annotation list can be found; None where `file` is the image itself
    image: str | None = None

    def __str__(self) -> str:
        where = self.file if self.record is None else f"{self.file} record {self.record}"
        if self.record is not None and self.image:
            where += f" ({self.image})"
        return f"{where}: {self.kind}: {self.message}"


class UnusableInput(Exception):
    """The source cannot be read at all; the message is one line naming the file."""


@dataclass(frozen=True)
class SourceLayout:
    annotation_names: tuple[str, ...]  # the first existing one is used
    image_field: str
    splits: tuple[str, ...]
    carves_val: bool = False  # no official val split: hold out training identities
    has_attributes: bool = False


LAYOUTS = {
    "synthpedes": SourceLayout(("synthpedes.json",), "file_path", SPLITS, has_attributes=True),
    "cuhk-pedes": SourceLayout(("reid_raw.json",), "file_path", SPLITS),
    "icfg-pedes": SourceLayout(("ICFG-PEDES.json", "ICFG_PEDES.json"), "file_path", ("train", "test"), carves_val=True),
    "rstpreid": SourceLayout(("data_captions.json",), "img_path", SPLITS),
}


@dataclass(frozen=True)
class LoadedSource:
    """Records read from one annotation file, with each record's index in that file."""

    annotation_file: Path
    records: list[RawRecord]
    indices: list[int]
    problems: list[Problem]
    total_records: int  # entries in the annotation list, including rejected ones


def load_raw_records(
    fmt: str,
    root: str | Path,
    annotations: str | Path | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[list[RawRecord], list[Problem]]:
    """The structurally valid records of a source and the problems of the others."""
    loaded = read_source(fmt, root, annotations, val_fraction=val_fraction, seed=seed)
    return loaded.records, loaded.problems


def read_source(
    fmt: str,
    root: str | Path,
    annotations: str | Path | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> LoadedSource:
    """Like `load_raw_records`, keeping the annotation index of every record.

    `annotations` overrides the format's annotation file: an absolute path, or a
    path relative to the working directory, or else relative to `root`.
    """
    if fmt not in LAYOUTS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    layout = LAYOUTS[fmt]
    root = Path(root)
    if not root.is_dir():
        raise UnusableInput(f"{root}: no such data set folder")
    annotation_file = _annotation_file(layout, root, annotations)
    entries = _read_json_list(annotation_file)
    records, indices, problems = [], [], []
    for index, entry in enumerate(entries):
        record, record_problems = _parse_record(entry, index, annotation_file.name, layout)
        problems.extend(record_problems)
        if record is not None:
            records.append(record)
            indices.append(index)
    if layout.carves_val:
        records = carve_val_split(records, val_fraction, seed)
    return LoadedSource(annotation_file, records, indices, problems, len(entries))


def _annotation_file(layout: SourceLayout, root: Path, annotations: str | Path | None) -> Path:
    if annotations is not None:
        given = Path(annotations)
        path = given if given.is_absolute() or given.exists() else root / given
        if not path.is_file():
            raise UnusableInput(f"{annotations}: no such annotation file (looked in the working directory and {root})")
        return path
    for name in layout.annotation_names:
        if (root / name).is_file():
            return root / name
    raise UnusableInput(f"{root / layout.annotation_names[0]}: no such annotation file")


def _read_json_list(path: Path) -> list:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UnusableInput(f"{path}: cannot read ({error.strerror or error})") from error
    except UnicodeDecodeError as error:
        raise UnusableInput(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        raise UnusableInput(f"{path}: not valid JSON ({error.msg} at {where})") from error
    if not isinstance(entries, list):
        raise UnusableInput(f"{path}: expected a JSON list of records, found a {type(entries).__name__}")
    return entries


def _parse_record(
    entry: object, index: int, annotation_name: str, layout: SourceLayout
) -> tuple[RawRecord | None, list[Problem]]:
    image = entry.get(layout.image_field) if isinstance(entry, dict) else None
    image = image if isinstance(image, str) and image.strip() else None

    def problem(kind: str, message: str) -> Problem:
        return Problem(annotation_name, index, kind, message, image)

    if not isinstance(entry, dict):
        return None, [problem("wrong-type", f"record is a {type(entry).__name__}, expected an object")]
    required = ("split", "captions", layout.image_field, "id") + (("attributes",) if layout.has_attributes else ())
    missing = [name for name in required if name not in entry]
    if missing:
        names = ", ".join(repr(name) for name in missing)
        return None, [problem("missing-field", f"no {names} field{'s' if len(missing) > 1 else ''}")]
    problems = [problem(kind, message) for kind, message in _field_errors(entry, layout)]
    if problems:
        return None, problems
    file_path = record_image_path(entry[layout.image_field])
    record = RawRecord(
        split=entry["split"],
        captions=list(entry["captions"]),
        file_path=file_path,
        original_id=entry["id"],
        where=f"{annotation_name} record {index} ({file_path})",
        attributes=dict(entry.get("attributes", {})),
    )
    return record, []


def _field_errors(entry: dict, layout: SourceLayout) -> list[tuple[str, str]]:
    errors = []
    captions = entry["captions"]
    if not isinstance(captions, list):
        errors.append(("wrong-type", f"'captions' must be a list of strings, got {_describe(captions)}"))
    else:
        errors += [
            ("wrong-type", f"caption {i} must be a string, got {_describe(c)}")
            for i, c in enumerate(captions)
            if not isinstance(c, str)
        ]
    image_path = entry[layout.image_field]
    if not isinstance(image_path, str) or not image_path.strip():
        errors.append(("wrong-type", f"{layout.image_field!r} must be a non-empty string, got {_describe(image_path)}"))
    elif escapes_root(image_path):
        errors.append(("path-escapes-root", f"{layout.image_field!r} {image_path!r} leaves the data root "
                       "(an absolute path or one through ..): images are read from inside data.root only"))
    # bool is a subclass of int, but `true` is never a person id.
    if not isinstance(entry["id"], int) or isinstance(entry["id"], bool):
        errors.append(("wrong-type", f"'id' must be an integer, got {_describe(entry['id'])}"))
    elif not -(2**63) <= entry["id"] < 2**63:
        errors.append(("id-out-of-range", f"'id' {entry['id']} does not fit in 64 bits"))
    if entry["split"] not in layout.splits:
        errors.append(("invalid-split", f"'split' is {entry['split']!r}, expected one of {', '.join(layout.splits)}"))
    if layout.has_attributes and not isinstance(entry["attributes"], dict):
        errors.append(("wrong-type", f"'attributes' must be an object, got {_describe(entry['attributes'])}"))
    return errors


def record_image_path(image_path: str) -> str:
    """Where under the data root prepare reads a record's image: `imgs/` and the normalised path as the
    annotation file spells it (CUHK01/./x.png is imgs/CUHK01/x.png)."""
    return f"{IMAGE_DIR}/{posixpath.normpath(image_path)}"


def named_images(fmt: str, root: str | Path, annotations: str | Path | None = None) -> tuple[Path, list[str]]:
    """A source's annotation file and the image paths of every record that names one inside the root.

    Paths are relative to `root`, as `record_image_path` gives them, in file order. The records are
    not checked further. So the result is a superset of the images prepare reads. The `externals`
    stage digests it instead of walking every file under the root. Raises UnusableInput as
    `read_source` does."""
    layout = LAYOUTS[fmt]
    annotation_file = _annotation_file(layout, Path(root), annotations)
    named = []
    for entry in _read_json_list(annotation_file):
        image = entry.get(layout.image_field) if isinstance(entry, dict) else None
        if isinstance(image, str) and image.strip() and not escapes_root(image):
            named.append(record_image_path(image))
    return annotation_file, named


def escapes_root(image_path: str) -> bool:
    """An annotation's image path that points outside the image folder: absolute, or through `..`."""
    normal = posixpath.normpath(image_path.replace("\\", "/"))
    return normal.startswith("/") or normal == ".." or normal.startswith("../") or (len(normal) > 1 and normal[1] == ":")


def annotation_image_path(file_path: str) -> str:
    """A record's image path as its annotation file spells it (RawRecord.file_path has `imgs/` in front)."""
    return file_path.removeprefix(f"{IMAGE_DIR}/")


def _describe(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def carve_val_split(records: list[RawRecord], val_fraction: float, seed: int) -> list[RawRecord]:
    """Move the records of a seeded sample of training identities to a "val" split."""
    train_ids = sorted({r.original_id for r in records if r.split == "train"})
    count = round(val_fraction * len(train_ids))
    if val_fraction > 0 and len(train_ids) >= 2:
        count = min(max(count, 1), len(train_ids) - 1)  # keep both splits non-empty
    else:
        count = 0
    if count == 0:
        return records
    rng = np.random.default_rng(seed)
    val_ids = {int(i) for i in rng.choice(train_ids, size=count, replace=False)}
    return [replace(r, split="val") if r.split == "train" and r.original_id in val_ids else r for r in records]


