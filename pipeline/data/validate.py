"""Checks a data set before it is canonicalised, and the `check-data` command.

Structural problems are found while reading (see `sources`). Here the records that
read fine are checked against their images and against each other.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline.data.canonical import SPLITS, RawRecord
from pipeline.data.sources import (
    FORMATS,
    Problem,
    UnusableInput,
    annotation_image_path,
    load_raw_records,
    read_source,
)

__all__ = [
    "FORMATS",
    "Problem",
    "UnusableInput",
    "ValidationResult",
    "check_data_command",
    "check_records",
    "load_raw_records",
    "split_stats",
    "validate_source",
]

# Errors PIL raises for files it cannot identify or decode.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ValidationResult:
    records: list[RawRecord]  # every structurally valid record, in annotation order
    record_indices: list[int]  # the annotation index of each of `records`
    problems: list[Problem]  # ordered by record index
    stats: dict[str, dict]  # split_stats of `records`
    annotation_file: Path
    total_records: int  # entries in the annotation list, rejected ones included
    # information, not problems: what prepare fixes on its own (a non-RGB image is converted to RGB)
    notes: list[Problem] = field(default_factory=list)

    def bad_indices(self) -> set[int]:
        return {p.record for p in self.problems if p.record is not None}

    def clean_records(self) -> list[RawRecord]:
        bad = self.bad_indices()
        return [r for r, i in zip(self.records, self.record_indices) if i not in bad]

    def skipped(self) -> list[tuple[int, str, list[str]]]:
        """(annotation index, where, problem kinds) of every record with a problem."""
        where = dict(zip(self.record_indices, (r.where for r in self.records)))
        kinds: dict[int, list[str]] = {}
        for problem in self.problems:
            if problem.record is not None:
                kinds.setdefault(problem.record, []).append(problem.kind)
        fallback = f"{self.annotation_file.name} record "
        return [(i, where.get(i, f"{fallback}{i}"), kinds[i]) for i in sorted(kinds)]


def validate_source(
    fmt: str,
    root: str | Path,
    annotations: str | Path | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> ValidationResult:
    """Read a source and check it; raises `UnusableInput` if it cannot be read at all."""
    loaded = read_source(fmt, root, annotations, val_fraction=val_fraction, seed=seed)
    notes: list[Problem] = []
    checked = check_records(loaded.records, root, indices=loaded.indices, annotation_name=loaded.annotation_file.name,
                            notes=notes)
    return ValidationResult(
        records=loaded.records,
        record_indices=loaded.indices,
        problems=_by_record(loaded.problems + checked),
        stats=split_stats(loaded.records),
        annotation_file=loaded.annotation_file,
        total_records=loaded.total_records,
        notes=notes,
    )


def _by_record(problems: list[Problem]) -> list[Problem]:
    # Stable, so the problems of one record keep the order the checks found them in.
    return sorted(problems, key=lambda p: -1 if p.record is None else p.record)


def check_records(
    records: list[RawRecord],
    root: str | Path,
    *,
    indices: list[int] | None = None,
    annotation_name: str = "annotations",
    notes: list[Problem] | None = None,
) -> list[Problem]:
    """Problems of images, captions, paths and identities, in record order.

    `indices` are the records' annotation indices, by default their positions.
    `annotation_name` is the file that problems not about an image are reported in. A problem
    line of the annotation file names the record's image too. What is only information, such as
    a non-RGB image that prepare converts, is appended to `notes` when given.
    """
    indices = list(range(len(records))) if indices is None else list(indices)
    found: list[tuple[int, Problem]] = []
    image_problems, image_info = _image_problems(records, Path(root))
    for position, kind, message in image_problems:
        found.append((position, Problem(records[position].file_path, indices[position], kind, message)))
    if notes is not None:
        notes.extend(Problem(records[p].file_path, indices[p], kind, message) for p, kind, message in image_info)
    record_checks = (_caption_problems(records), _duplicate_path_problems(records, indices), _split_leaks(records))
    for problems in record_checks:
        for position, kind, message in problems:
            image = annotation_image_path(records[position].file_path)
            found.append((position, Problem(annotation_name, indices[position], kind, message, image)))
    found.sort(key=lambda item: item[0])
    return [problem for _, problem in found]



def _image_problems(records: list[RawRecord], root: Path) -> tuple[list[tuple[int, str, str]], list[tuple[int, str, str]]]:
    """(problems, notes): each distinct image is opened and decoded once; what is found goes to its
    first record."""
    first_use: dict[str, int] = {}
    for position, record in enumerate(records):
        first_use.setdefault(record.file_path, position)
    paths = [root / file_path for file_path in first_use]
    workers = min(32, 4 * (os.cpu_count() or 1))  # threads overlap the file IO
    inside = root.resolve()

    def inspect(path: Path) -> tuple[str, str] | None:
        if path.exists() and not path.resolve().is_relative_to(inside):  # a symlink out of the root
            return "path-escapes-root", f"resolves to {path.resolve()}, outside the data root {inside}"
        return _inspect_image(path)

    with _strict_decoding(), ThreadPoolExecutor(max_workers=workers) as pool:
        verdicts = list(pool.map(inspect, paths))
    found = [(position, *verdict) for position, verdict in zip(first_use.values(), verdicts) if verdict]
    problems = [item for item in found if item[1] not in NOTE_KINDS]
    return problems, [item for item in found if item[1] in NOTE_KINDS]


# what `_inspect_image` reports that is not a problem: prepare writes such an image converted to RGB
NOTE_KINDS = ("non-rgb-image",)


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Make PIL raise on truncated images even if someone relaxed it process-wide."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _inspect_image(path: Path) -> tuple[str, str] | None:
    """(kind, message) of what is wrong with (or, for NOTE_KINDS, worth knowing about) one image file, or None."""
    if not path.is_file():
        return "missing-image", "no such file"
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        return "unreadable-image", "not an image format PIL recognises"
    except _IMAGE_ERRORS as error:
        return "unreadable-image", f"cannot open: {error}"
    with image:
        try:
            image.load()
        except _IMAGE_ERRORS as error:
            return "truncated-image", f"image data cut short or corrupt: {error}"
        if image.mode != "RGB":
            return "non-rgb-image", f"mode {image.mode}, not RGB: prepare converts it to RGB"
    return None


def _caption_problems(records: list[RawRecord]) -> list[tuple[int, str, str]]:
    problems = []
    for position, record in enumerate(records):
        if not record.captions:
            problems.append((position, "empty-caption", "no captions"))
            continue
        blank = [str(i) for i, caption in enumerate(record.captions) if not caption.strip()]
        if blank:
            problems.append((position, "empty-caption", f"caption {', '.join(blank)} is blank"))
    return problems


def _duplicate_path_problems(records: list[RawRecord], indices: list[int]) -> list[tuple[int, str, str]]:
    first_use: dict[str, int] = {}
    problems = []
    for position, record in enumerate(records):
        first = first_use.setdefault(record.file_path, position)
        if first != position:
            problems.append((position, "duplicate-path", f"{record.file_path} is already record {indices[first]}"))
    return problems


def _split_leaks(records: list[RawRecord]) -> list[tuple[int, str, str]]:
    """Records of an identity outside the split that identity first appears in."""
    first_split: dict[int, str] = {}
    problems = []
    for position, record in enumerate(records):
        home = first_split.setdefault(record.original_id, record.split)
        if record.split != home:
            message = f"id {record.original_id} is in {record.split} but already in {home}"
            problems.append((position, "id-in-two-splits", message))
    return problems


def split_stats(records: list[RawRecord]) -> dict[str, dict]:
    """Per split present: identities, images, captions and mean caption length in words."""
    stats = {}
    for split in SPLITS:
        rows = [r for r in records if r.split == split]
        if not rows:
            continue
        word_counts = [len(caption.split()) for r in rows for caption in r.captions]
        stats[split] = {
            "identities": len({r.original_id for r in rows}),
            "images": len(rows),
            "captions": len(word_counts),
            "mean_caption_words": round(sum(word_counts) / len(word_counts), 2) if word_counts else 0.0,
        }
    return stats


_TABLE_COLUMNS = (
    ("identities", "identities", "d"),
    ("images", "images", "d"),
    ("captions", "captions", "d"),
    ("mean_caption_words", "words/caption", ".1f"),
)


def format_stats_table(stats: dict[str, dict]) -> str:
    header = "split  " + "  ".join(title for _, title, _ in _TABLE_COLUMNS)
    lines = [header]
    for split, row in stats.items():
        cells = [f"{row[key]:{len(title)}{fmt}}" for key, title, fmt in _TABLE_COLUMNS]
        lines.append(f"{split:<5}  " + "  ".join(cells))
    return "\n".join(lines)


def check_data_command(fmt: str, root: str | Path, annotations: str | Path | None = None) -> int:
    """Print statistics and problems; exit status 0 clean, 1 problems, 2 unusable input."""
    try:
        result = validate_source(fmt, root, annotations)
    except UnusableInput as error:
        print(f"check-data: {error}", file=sys.stderr)
        return 2
    print(f"{fmt}: {result.annotation_file}")
    print(format_stats_table(result.stats))
    for problem in result.problems:
        print(problem)
    for note in result.notes:
        print(f"note: {note}")
    print(_summary(result))
    return 1 if result.problems else 0


def _summary(result: ValidationResult) -> str:
    if not result.problems:
        notes = f" ({len(result.notes)} note(s), listed above)" if result.notes else ""
        return f"OK: {result.total_records} records, no problems{notes}"
    bad = len(result.bad_indices())
    return f"FAILED: {len(result.problems)} problem(s) in {bad} of {result.total_records} records"
