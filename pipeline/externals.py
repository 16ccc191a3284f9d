"""Digests of what params name outside the repository, so that DVC sees it change.

`data.root` (a real benchmark's annotation file and images), `model.vision_path` /
`model.text_path`, `generator.pretrained`, `filter.scorer` and `caption.captioner` are strings
in params.yaml: DVC tracks the string, not the folder behind it. The `externals` stage (always
run: a few seconds, most of it importing the library, when nothing changed) writes one JSON file
per consuming stage, `data/externals/<stage>.json`, with a sha256 over the contents of every file
the input holds;
each consumer depends on its file. An edited annotation file or a swapped checkpoint changes the
digest, so DVC reruns what reads it; an unchanged one writes the same bytes, so nothing else
reruns.

A hub id must pin `hub.revision` to a commit: its files are then immutable, and the id with the
commit is its digest (downloaded or not). An unreadable file is recorded as a problem line, on
which the consuming stage stops. Contents are hashed once per file: a state file under `.dvc/tmp`
remembers each file's (size, mtime, inode) and digest, as DVC itself does, so later runs only stat.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from pipeline.config import Params
from pipeline.io import file_digest, write_json_atomic
from pipeline.profile import ALL_INPUTS, STAGE_INPUTS, check_inputs

log = logging.getLogger(__name__)

STATE_FILE = Path(".dvc/tmp/externals-state.json")


class DigestState:
    """(size, mtime_ns, inode) -> sha256 per absolute file path, kept between runs."""

    def __init__(self, path: Path = STATE_FILE):
        self.path, self.hashed = path, 0
        try:
            self.known = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def digest(self, file: Path) -> str:
        stat = file.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        key = str(file.resolve())
        entry = self.known.get(key)
        if entry and entry.get("stamp") == stamp:
            return entry["sha256"]
        self.hashed += 1
        digest = file_digest(file)
        self.known[key] = {"stamp": stamp, "sha256": digest}
        return digest

    def save(self) -> None:
        if self.path.parent.is_dir():
            write_json_atomic(self.path, self.known)


def tree_digest(root: Path, state: DigestState) -> tuple[str, int]:
    """sha256 over (relative path, content sha256) of every file under `root`, links followed, in
    path order; and the file count."""
    def unreadable(err: OSError) -> None:
        raise err

    lines = []
    for folder, _, files in os.walk(root, followlinks=True, onerror=unreadable):
        for name in files:
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            if path.is_file():
                lines.append(f"{relative}\0{state.digest(path)}")
            elif path.is_symlink():  # a link to nothing: what it points at is part of the folder
                lines.append(f"{relative}\0link to {os.readlink(path)}")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest(), len(lines)


def _folder_entry(path: Path, state: DigestState) -> dict:
    if path.is_file():
        return {"sha256": state.digest(path), "files": 1}
    digest, count = tree_digest(path, state)
    return {"sha256": digest, "files": count}


def _hub_entry(hub_id: str, params: Params) -> dict:
    """A hub id at a pinned commit (the check before any work requires one) names immutable files:
    the id and the commit are the digest, whether or not the local cache holds them yet."""
    return {"hub_id": hub_id, "revision": params.hub.revision}


def input_entry(params: Params, key: str, state: DigestState) -> dict:
    """What one params key names, and its digest; {"reads": false} where the profile does not read it."""
    section, name = key.split(".")
    value = getattr(getattr(params, section), name)
    if key == "data.root":
        if params.data.source == "synthpedes":
            return {"value": value, "reads": False}
        from pipeline.data.sources import LAYOUTS, _annotation_file

        annotations = _annotation_file(LAYOUTS[params.data.source], Path(value), params.data.annotations or None)
        return {"value": value, "reads": True, **_folder_entry(Path(value), state),
                "annotations": {"path": str(annotations), **_folder_entry(annotations, state)}}
    if not value or (key.startswith("model.") and params.model.preset == "tiny"):
        return {"value": value, "reads": False}
    if key == "filter.scorer" and value.startswith("models/"):
        return {"value": value, "reads": True, "tracked_by": "dvc.yaml (an output of this DAG)"}
    path = Path(value).expanduser()
    if path.exists():
        return {"value": value, "reads": True, **_folder_entry(path, state)}
    return {"value": value, "reads": True, **_hub_entry(value, params)}


def _entry_or_problem(params: Params, key: str, state: DigestState) -> dict:
    try:
        return input_entry(params, key, state)
    except OSError as err:  # an unreadable file or folder under it: the consumer stops on this line
        return {"problems": [f"params: '{key}': {err.filename or ''}: {err.strerror or err}"]}


def stage_digests(params: Params, state: DigestState) -> dict[str, dict]:
    """Per consuming stage, its external inputs' entries. An input with a problem (a missing folder)
    records the problem's line instead: the consuming stage stops on it with that line."""
    entries = {}
    for key in ALL_INPUTS:  # once per key: generate and train_generator read the same folder
        problems = check_inputs(params, (key,))
        entries[key] = {"problems": problems} if problems else _entry_or_problem(params, key, state)
    return {stage: {key: entries[key] for key in keys} for stage, keys in STAGE_INPUTS.items()}


def write_stage_digests(params: Params, out: Path, state: DigestState | None = None) -> dict[str, dict]:
    state = state or DigestState()
    digests = stage_digests(params, state)
    out.mkdir(parents=True, exist_ok=True)
    for stage, entries in digests.items():
        write_json_atomic(out / f"{stage}.json", entries)
    state.save()
    log.info("external inputs of %d stages digested (%d file(s) hashed, the rest known by size and mtime)",
             len(digests), state.hashed)
    return digests
