"""Atomic writes and content digests.

With atomic writes, a killed stage never leaves a half-written file or directory under its final
name. Content digests are read once per file and then known by its stat (DigestCache)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from stat import S_ISREG
from typing import Callable, Iterator


def temp_path_for(path: str | Path) -> Path:
    """A sibling temporary name (same folder, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def writing_file(path: str | Path) -> Iterator[Path]:
    """`with writing_file(out) as tmp: write tmp`: renamed onto `out` when the block ends without an
    error, removed on an error, so `out` is always whole (the old file or the new one). Creates
    `out`'s folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_bytes_atomic(path: str | Path, payload: bytes) -> None:
    with writing_file(path) as tmp:
        tmp.write_bytes(payload)


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


# -- the content-digest cache --------------------------------------------------------------------
# Fingerprints and the `externals` stage digest contents, but reading every byte at every start costs
# minutes at scale (150 GB of shards per rank). A DigestCache remembers each file's (size, mtime_ns,
# inode) with its sha256, as DVC's own state does: an unchanged file costs one stat. Inside a DVC
# project it lives in .dvc/tmp/digests/, in 256 buckets by folder, so that a stage loads and rewrites
# only the buckets of the folders it reads (the shards' folder, not a million image entries).

DIGEST_CACHE_DIR = Path(".dvc/tmp/digests")
# A file modified this recently may change again within the same mtime tick (a few ms on ext4, 2 s on
# FAT) without changing its stamp: its digest is not remembered until it is older (git's "racy" files).
RACY_NS = 2_000_000_000


class DigestCache:
    """(size, mtime_ns, inode) -> sha256 per file, persisted in `folder` (None: this process only).

    A bucket file that cannot be read or parsed counts as empty. A save re-reads each bucket it
    changes, adds its own entries and replaces the file atomically. So concurrent writers (ranks,
    `dvc exp run` jobs) never corrupt it. At worst they drop each other's newest entries, which are
    rehashed later.
    """

    def __init__(self, folder: str | Path | None = None):
        self.folder = None if folder is None else Path(folder)
        self.hashed = 0  # files read in full by this cache (tests and logs count them)
        self._buckets: dict[str, dict] = {}  # bucket -> {absolute folder: {name: [size, mtime_ns, inode, sha256]}}
        self._dirty: dict[str, dict] = {}  # what this process added, per bucket, since its last save
        self._bucket_of: dict[str, str] = {}

    def digest(self, path: str | Path, stat: os.stat_result | None = None) -> str:
        """The sha256 of `path`'s contents; `stat` is its os.stat() if the caller has it already."""
        folder, name = os.path.split(os.path.abspath(path))
        return self.digest_in(folder, name, stat)

    def digest_in(self, folder: str, name: str, stat: os.stat_result | None = None) -> str:
        """`digest` of `folder`/`name`, `folder` absolute and normalised (os.path.abspath): for loops
        over many files of few folders, which then pay one stat per unchanged file and no path work."""
        started = time.time_ns()
        path = f"{folder}/{name}" if folder != "/" else f"/{name}"
        stat = stat or os.stat(path)
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        bucket = self._bucket_of.get(folder) or self._bucket_of.setdefault(
            folder, hashlib.sha256(folder.encode("utf-8", "surrogateescape")).hexdigest()[:2])
        names = self._bucket(bucket).get(folder)
        entry = names.get(name) if isinstance(names, dict) else None
        if isinstance(entry, list) and len(entry) == 4 and entry[:3] == stamp and isinstance(entry[3], str):
            return entry[3]
        digest = file_digest(path)
        self.hashed += 1
        if started - stat.st_mtime_ns >= RACY_NS:
            entry = [*stamp, digest]
            known = self._bucket(bucket)
            if not isinstance(known.get(folder), dict):
                known[folder] = {}
            known[folder][name] = entry
            self._dirty.setdefault(bucket, {}).setdefault(folder, {})[name] = entry
        return digest

    def _bucket(self, bucket: str) -> dict:
        known = self._buckets.get(bucket)
        if known is None:
            known = self._buckets[bucket] = self._read(bucket)
        return known

    def _read(self, bucket: str) -> dict:
        if self.folder is None:
            return {}
        try:
            known = json.loads((self.folder / f"{bucket}.json").read_bytes())
        except (OSError, ValueError):  # missing, unreadable, cut short or not JSON: start empty
            return {}
        return known if isinstance(known, dict) else {}

    def save(self) -> None:
        """Write the buckets this process added entries to (one line of JSON each, atomically); folders
        that no longer exist are dropped from them. A cache that cannot be written is only a warning."""
        if self.folder is None or not self._dirty:
            self._dirty.clear()
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for bucket, added in self._dirty.items():
                merged = {folder: names for folder, names in self._read(bucket).items()  # others' saves too
                          if isinstance(names, dict) and os.path.isdir(folder)}
                for folder, names in added.items():
                    merged[folder] = {**merged.get(folder, {}), **names}
                payload = json.dumps(merged, separators=(",", ":"))  # ASCII: any file name round-trips
                write_bytes_atomic(self.folder / f"{bucket}.json", payload.encode())
                self._buckets[bucket] = merged
        except OSError as err:
            logging.getLogger(__name__).warning("digest cache %s not saved (%s): the next run hashes again",
                                                self.folder, err.strerror or err)
        self._dirty.clear()


_PROJECT_CACHES: dict[str | None, DigestCache] = {}


def project_digest_cache() -> DigestCache:
    """The digest cache of the DVC project in the working directory.

    It lives in .dvc/tmp/digests/ and is shared by every stage, rank and run of the checkout. Outside
    a DVC project it lives in this process's memory. There is one instance per process, so that
    repeated digests in one process do not reload the buckets."""
    folder = os.path.abspath(DIGEST_CACHE_DIR) if DIGEST_CACHE_DIR.parent.is_dir() else None
    if folder not in _PROJECT_CACHES:
        _PROJECT_CACHES[folder] = DigestCache(folder)
    return _PROJECT_CACHES[folder]


def files_digest(paths, cache: DigestCache | None = None) -> list[list[str]]:
    """[folder name, file name, sha256 of its contents] per file, in the given order: what a
    fingerprint records of its data inputs. Through the project's digest cache: an unchanged file
    is stat'ed, not read."""
    cache = cache or project_digest_cache()
    rows = [[Path(f).parent.name, Path(f).name, cache.digest(f)] for f in paths]
    cache.save()
    return rows


def tree_digest(root: str | Path, cache: DigestCache | None = None,
                keep: Callable[[str], bool] | None = None) -> tuple[str, int]:
    """sha256 over (relative path, content sha256) of the regular files under `root`, and the file count.

    Files count when `keep(name)` accepts their name (all by default). Links are followed, and files
    go in path order. A link to nothing counts as its target's name, since what it points at is part
    of the folder."""
    cache = cache or project_digest_cache()
    root = os.fspath(root)

    def unreadable(err: OSError) -> None:
        raise err

    lines = []
    for folder, _, files in os.walk(root, followlinks=True, onerror=unreadable):
        prefix, absolute = Path(os.path.relpath(folder, root)).as_posix(), os.path.abspath(folder)
        for name in files:
            if keep is not None and not keep(name):
                continue
            path, relative = os.path.join(folder, name), name if prefix == "." else f"{prefix}/{name}"
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                if not os.path.islink(path):
                    raise
                lines.append(f"{relative}\0link to {os.readlink(path)}")
                continue
            if S_ISREG(stat.st_mode):
                lines.append(f"{relative}\0{cache.digest_in(absolute, name, stat)}")
    cache.save()
    return hashlib.sha256("\n".join(sorted(lines)).encode("utf-8", "surrogateescape")).hexdigest(), len(lines)


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
