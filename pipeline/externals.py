"""Digests of what params name outside the repository, so that DVC sees it change.

Some inputs are strings in params.yaml:
- `data.root` (a real benchmark's annotation file and images),
- `model.vision_path` / `model.text_path`,
- `generator.pretrained`, `filter.scorer` and `caption.captioner`.
DVC tracks the string, not the folder behind it. The `externals` stage therefore writes one JSON
file per consuming stage, `data/externals/<stage>.json`. It holds a sha256 over the contents of what
the input holds, and each consumer depends on its file. The stage always runs. When nothing changed
it takes a few seconds, most of it importing the library. An edited annotation file or a swapped
checkpoint changes the digest, so DVC reruns what reads it. An unchanged one writes the same bytes,
so nothing else reruns.

A real benchmark's root is digested as its annotation file and the images that file names. That is
what prepare can read. The stage does not walk the whole tree. At 1.5 M images, a walk, a stat and a
path resolution per file on every `dvc repro` is what made the stage slow. Files the annotation file
does not name cannot change what prepare makes. A named image that is missing is a line of the
digest. Prepare reports it, or skips its record under data.skip_bad_records. A named image that
cannot be read is a problem line. A model folder holds few files, so it is walked.

A hub id must pin `hub.revision` to a commit. Its files are then immutable, and the id with the
commit is its digest, whether downloaded or not. An unreadable file is recorded as a problem line,
and the consuming stage stops on it. Contents are hashed once per file, through the project's digest
cache (pipeline/core/io.py, DigestCache). Later runs only stat.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from stat import S_ISREG

from pipeline.core.config import Params
from pipeline.core.io import DigestCache, project_digest_cache, tree_digest, write_json_atomic
from pipeline.core.profile import ALL_INPUTS, STAGE_INPUTS, check_inputs

log = logging.getLogger(__name__)

# Where the state of the stage lived before the project-wide digest cache: deleted when found (it
# held a pretty-printed entry per file under data.root, 320 MB at 1.5 M files).
LEGACY_STATE_FILE = Path(".dvc/tmp/externals-state.json")


def _folder_entry(path: Path, cache: DigestCache) -> dict:
    if path.is_file():
        return {"sha256": cache.digest(path), "files": 1}
    digest, count = tree_digest(path, cache)
    return {"sha256": digest, "files": count}


def data_root_entry(source: str, root: Path, annotations: str | None, cache: DigestCache) -> dict:
    """A real benchmark's annotation file and the images it names, as one sha256.

    The hash covers the annotation file's digest and, per distinct named image, its path under the
    root with its content sha256 or `missing`. Images come in the annotation file's order. A reordered
    file is another file, and its own digest changes anyway. An annotation file that is not a JSON list
    names no image. Prepare stops on it with its own line, and fixing the file changes the digest."""
    from pipeline.data.sources import LAYOUTS, UnusableInput, _annotation_file, named_images

    annotation_file = _annotation_file(LAYOUTS[source], root, annotations)
    annotation_digest = cache.digest(annotation_file)  # unreadable: OSError, a problem line
    try:
        images = list(dict.fromkeys(named_images(source, root, annotation_file)[1]))  # in file order, once
    except UnusableInput:
        images = []
    lines, missing, base, folders = [f"annotations\0{annotation_digest}"], 0, os.path.abspath(root).rstrip("/"), {}
    for relative in images:  # normalised by named_images: base/relative is an absolute, normal path
        parent, _, name = relative.rpartition("/")
        folder = folders.get(parent) or folders.setdefault(parent, f"{base}/{parent}")
        try:
            stat = os.stat(f"{folder}/{name}")
        except (FileNotFoundError, NotADirectoryError):  # no such file, or a dangling link
            stat = None
        if stat is None or not S_ISREG(stat.st_mode):
            lines.append(f"{relative}\0missing")
            missing += 1
        else:
            lines.append(f"{relative}\0{cache.digest_in(folder, name, stat)}")
    entry = {"sha256": hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest(),
             "files": 1 + len(images) - missing}
    if missing:
        entry["missing_images"] = missing
    return {**entry, "annotations": {"path": str(annotation_file), "sha256": annotation_digest, "files": 1}}


def _hub_entry(hub_id: str, params: Params) -> dict:
    """A hub id at a pinned commit (the check before any work requires one) names immutable files:
    the id and the commit are the digest, whether or not the local cache holds them yet."""
    return {"hub_id": hub_id, "revision": params.hub.revision}


def input_entry(params: Params, key: str, cache: DigestCache) -> dict:
    """What one params key names, and its digest; {"reads": false} where the profile does not read it."""
    section, name = key.split(".")
    value = getattr(getattr(params, section), name)
    if key == "data.root":
        if params.data.source == "synthpedes":
            return {"value": value, "reads": False}
        return {"value": value, "reads": True,
                **data_root_entry(params.data.source, Path(value), params.data.annotations or None, cache)}
    if not value or (key.startswith("model.") and params.model.preset == "tiny"):
        return {"value": value, "reads": False}
    if key == "filter.scorer" and value.startswith("models/"):
        return {"value": value, "reads": True, "tracked_by": "dvc.yaml (an output of this DAG)"}
    path = Path(value).expanduser()
    if path.exists():
        return {"value": value, "reads": True, **_folder_entry(path, cache)}
    return {"value": value, "reads": True, **_hub_entry(value, params)}


def _entry_or_problem(params: Params, key: str, cache: DigestCache) -> dict:
    try:
        return input_entry(params, key, cache)
    except OSError as err:  # an unreadable file or folder under it: the consumer stops on this line
        return {"problems": [f"params: '{key}': {err.filename or ''}: {err.strerror or err}"]}


def stage_digests(params: Params, cache: DigestCache) -> dict[str, dict]:
    """Per consuming stage, its external inputs' entries. An input with a problem (a missing folder)
    records the problem's line instead: the consuming stage stops on it with that line."""
    entries = {}
    for key in ALL_INPUTS:  # once per key: generate and train_generator read the same folder
        problems = check_inputs(params, (key,))
        entries[key] = {"problems": problems} if problems else _entry_or_problem(params, key, cache)
    return {stage: {key: entries[key] for key in keys} for stage, keys in STAGE_INPUTS.items()}


def write_stage_digests(params: Params, out: Path, cache: DigestCache | None = None) -> dict[str, dict]:
    cache = cache or project_digest_cache()
    digests = stage_digests(params, cache)
    out.mkdir(parents=True, exist_ok=True)
    for stage, entries in digests.items():
        write_json_atomic(out / f"{stage}.json", entries)
    cache.save()
    LEGACY_STATE_FILE.unlink(missing_ok=True)
    log.info("external inputs of %d stages digested (%d file(s) hashed, the rest known by size and mtime)",
             len(digests), cache.hashed)
    return digests
