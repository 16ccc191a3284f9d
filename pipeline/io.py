"""Atomic writes: a killed stage never leaves a half-written file or directory under its final name."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_path_for(path: str | Path) -> Path:
    """A sibling temporary name (same folder, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def commit_temp(tmp: Path, path: str | Path) -> None:
    os.replace(tmp, path)


def write_bytes_atomic(path: str | Path, payload: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    tmp.write_bytes(payload)
    commit_temp(tmp, path)


def write_json_atomic(path: str | Path, payload) -> None:
    """Pretty, key-sorted JSON so that equal content gives equal bytes."""
    write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8"))


# -- directories ---------------------------------------------------------------------------------
# A directory output is written in full under a staging name next to it, then swapped in with two
# renames: target -> old, staging -> target; old is deleted last. The previous directory stays whole
# until the new one is in place, so a process killed at any point leaves either of them under the
# final name, or (between the two renames) only `old`: `recover_directory` puts it back.


def staging_path(target: str | Path) -> Path:
    """Where `target`'s next version is written (a sibling, so the swap is a rename)."""
    target = Path(target)
    return target.with_name(f".{target.name}.staging")


def old_path(target: str | Path) -> Path:
    target = Path(target)
    return target.with_name(f".{target.name}.old")


def recover_directory(target: str | Path) -> None:
    """Undo what a killed swap or write left next to `target`: a previous version whose swap stopped
    between its two renames goes back under `target`; leftover old and staging folders are deleted."""
    target, old, staging = Path(target), old_path(target), staging_path(target)
    if old.is_dir() and not target.exists():
        os.replace(old, target)
        logging.getLogger(__name__).info("%s: restored the previous version from an interrupted swap", target)
    for leftover in (old, staging):
        if leftover.exists():
            shutil.rmtree(leftover)


def start_directory(target: str | Path) -> Path:
    """Recover `target` and return its empty, freshly made staging folder, to write the new version in."""
    recover_directory(target)
    staging = staging_path(target)
    staging.mkdir(parents=True)
    return staging


def replace_directory(staging: str | Path, target: str | Path) -> None:
    """Swap the complete `staging` folder in as `target`, keeping the old `target` until it is in place."""
    staging, target, old = Path(staging), Path(target), old_path(target)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old)


def remove_directory(target: str | Path) -> None:
    """Delete `target` as one step: renamed away first, so a kill never leaves half of it."""
    target, old = Path(target), old_path(target)
    recover_directory(target)
    if target.exists():
        os.replace(target, old)
        shutil.rmtree(old)


@contextmanager
def writing_directory(target: str | Path) -> Iterator[Path]:
    """`with writing_directory(out) as tmp: write into tmp`: swapped in as `out` when the block
    ends without an error; on an error the staging folder goes and `out` is as it was."""
    staging = start_directory(target)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, target)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's contents (what fingerprints use: sizes and mtimes miss same-size edits)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def files_digest(paths) -> list[list[str]]:
    """[folder name, file name, sha256 of its contents] per file, in the given order: what a
    fingerprint records of its data inputs."""
    return [[Path(f).parent.name, Path(f).name, file_digest(f)] for f in paths]


class BrokenArtifact(Exception):
    """An output of an earlier stage that cannot be read (a truncated shard, a model folder without its
    weights): the message names the file and the stage that makes it. A stage exits with that one line."""


# Where each DAG output starts (its dvc.yaml out) and the stage that writes it, for BrokenArtifact lines.
_MADE_BY = (("data/externals", "externals"), ("data/prepared", "prepare"), ("data/pdg/raw", "generate"), ("data/pdg/filtered", "filter"),
            ("data/pdg/train", "caption"), ("models/generator", "train_generator"), ("models/probe", "train_generator"),
            ("models/", "train@<variant>"), ("index/", "index@<variant>"))


def rerun_hint(path: str | Path) -> str:
    """`dvc repro --force <stage>` for the stage whose output holds `path`, or a general hint."""
    text = Path(path).as_posix()
    for prefix, stage in _MADE_BY:
        at = text.find(prefix)
        if at == 0 or (at > 0 and text[at - 1] == "/"):
            if stage.endswith("<variant>"):
                rest = text[at + len(prefix):].split("/")
                stage = stage.replace("<variant>", rest[0]) if rest and rest[0] else stage
            return f"dvc repro --force {stage}"
    return "dvc repro --force <the stage that writes it>"
