"""`python -m pipeline edit-captions`: colour edits of captions from a text or annotation file, as JSON lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.text.caption_edit import edit_captions


class CaptionInputError(Exception):
    """The input cannot be read as captions; the message says why in one line."""


def read_captions(path: str | Path) -> list[str]:
    """Captions of a .json annotation file (a list of records with `captions`) or of a text file, one per line."""
    path = Path(path)
    if not path.is_file():
        raise CaptionInputError(f"no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CaptionInputError(f"cannot read {path}: {error}") from None
    if path.suffix.lower() == ".json":
        return _annotation_captions(path, text)
    return [line.strip() for line in text.splitlines() if line.strip()]


def _annotation_captions(path: Path, text: str) -> list[str]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise CaptionInputError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(records, list):
        raise CaptionInputError(f"{path}: expected a JSON list of records with `captions`")
    captions = []
    for index, record in enumerate(records):
        record_captions = record.get("captions") if isinstance(record, dict) else None
        if isinstance(record_captions, str):
            record_captions = [record_captions]
        if not isinstance(record_captions, list) or not all(isinstance(c, str) for c in record_captions):
            raise CaptionInputError(f"{path}: record {index} has no `captions` list of strings")
        captions += record_captions
    return captions


def edit_captions_command(
    input_path: str, num: int, seed: int, output: str | None = None, allow_hair: bool = False
) -> int:
    """Write the edits as JSON lines; exit status 0, or 2 for unusable input."""
    try:
        if num < 1:
            raise CaptionInputError(f"--num must be at least 1, got {num}")
        captions = read_captions(input_path)
        per_caption = edit_captions(captions, num, seed, allow_hair=allow_hair)
        lines = [
            json.dumps({"caption_index": index, **edit.to_json()}, ensure_ascii=False)
            for index, edits in enumerate(per_caption)
            for edit in edits
        ]
        _write_lines(lines, output)
    except CaptionInputError as error:
        print(f"edit-captions: {error}", file=sys.stderr)
        return 2
    edited = sum(bool(edits) for edits in per_caption)
    print(f"edit-captions: {len(lines)} edits; {edited} of {len(captions)} captions had an editable colour",
          file=sys.stderr)
    return 0


def _write_lines(lines: list[str], output: str | None) -> None:
    payload = "".join(line + "\n" for line in lines)
    if output is None:
        sys.stdout.write(payload)
        return
    try:
        Path(output).write_text(payload, encoding="utf-8")
    except OSError as error:
        raise CaptionInputError(f"cannot write {output}: {error}") from None
