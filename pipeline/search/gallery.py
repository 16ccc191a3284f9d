"""The gallery a search answers from: a split of data/prepared (its tar shards) or a folder of crops.

A gallery is a table with one row per image. Its columns are these.
- `key`.
- `file` and `member`, which say where the image is. `member` names it inside a shard, and is ""
  for a loose file.
- `person_id`, -1 where unknown.
- `source`.

Reading an image back needs only its row, so the web page serves images straight from the shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.data.canonical import IMAGE_EXTENSIONS, list_shards
from pipeline.core.io import writing_file

PREPARED_SPLITS = ("test", "val")
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
UNKNOWN_PERSON = -1
TABLE_NAME = "gallery.parquet"
GALLERY_SCHEMA = pa.schema([("key", pa.string()), ("file", pa.string()), ("member", pa.string()),
                            ("person_id", pa.int64()), ("source", pa.string())])


class GalleryError(ValueError):
    """A gallery that cannot be searched: the message names the folder or file."""


@dataclass
class Gallery:
    keys: list[str]
    files: list[str]
    members: list[str]  # the tar member of a shard image, "" for a loose file
    person_ids: list[int]
    source: str  # "data/prepared:test" or the folder
    skipped: list[str] = field(default_factory=list)  # unreadable files of a folder, left out
    # where each shard image's bytes lie in its shard (offset, size), known when the shards were just
    # scanned (open_gallery), not stored in the table; None: looked up by member name
    spans: list[tuple[int, int]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def image_bytes(self, index: int) -> bytes:
        """The encoded image of row `index` (from its shard or its file)."""
        if not self.members[index]:
            return Path(self.files[index]).read_bytes()
        if self.spans is not None:
            return read_span(self.files[index], *self.spans[index])
        with tarfile.open(self.files[index], "r") as tar:
            return tar.extractfile(self.members[index]).read()

    def location(self, index: int) -> str:
        return f"{self.files[index]}:{self.members[index]}" if self.members[index] else self.files[index]

    def person_id(self, index: int) -> int | None:
        return None if self.person_ids[index] == UNKNOWN_PERSON else self.person_ids[index]


def describe(spec: str, prepared: str | Path) -> str:
    """What `search.gallery` names, for messages and the fingerprint."""
    return f"{Path(prepared)}:{spec}" if spec in PREPARED_SPLITS else str(Path(spec))


def open_gallery(spec: str, prepared: str | Path = "data/prepared") -> Gallery:
    """The gallery `search.gallery` names: its table only, no image read (a shard's images are located
    by their offsets, read while embedding). GalleryError when there is nothing to search."""
    if spec in PREPARED_SPLITS:
        return _prepared_gallery(Path(prepared), spec)
    return folder_gallery(spec)


def _prepared_gallery(prepared: Path, split: str) -> Gallery:
    shards = list_shards(prepared, split)
    if not shards:
        raise GalleryError(f"search.gallery '{split}': no {split} shards under {prepared / 'shards'} "
                           f"(run `dvc repro prepare`)")
    keys, files, members, pids, spans = [], [], [], [], []
    for shard in shards:
        with tarfile.open(shard, "r") as tar:  # headers and the small json members only
            rows: dict[str, dict] = {}
            for member in tar:
                key, _, ext = member.name.partition(".")
                entry = rows.setdefault(key, {})
                if ext == "json":
                    entry["json"] = json.loads(tar.extractfile(member).read())
                elif ext in IMAGE_EXTENSIONS and "member" not in entry:
                    entry["member"], entry["span"] = member.name, (member.offset_data, member.size)
            for key, entry in rows.items():
                if "member" not in entry:
                    raise GalleryError(f"{shard}: sample {key} has no image member ({', '.join(IMAGE_EXTENSIONS)})")
                keys.append(key)
                files.append(shard)
                members.append(entry["member"])
                pids.append(int(entry.get("json", {}).get("person_id", UNKNOWN_PERSON)))
                spans.append(entry["span"])
    return Gallery(keys, files, members, pids, describe(split, prepared), spans=spans)


def read_span(path: str | Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        payload = handle.read(size)
    if len(payload) != size:
        raise OSError(f"{path}: {size} bytes expected at offset {offset}, {len(payload)} there")
    return payload


def folder_images(folder: Path) -> list[Path]:
    """Every jpg/png/webp under `folder` (recursive), sorted by relative path."""
    return sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_EXTENSIONS),
                  key=lambda p: p.relative_to(folder).as_posix())


def folder_gallery(spec: str) -> Gallery:
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise GalleryError(f"search.gallery '{spec}': no such folder (and not one of {', '.join(PREPARED_SPLITS)})")
    paths = folder_images(folder)
    if not paths:
        raise GalleryError(f"search.gallery '{spec}': no images in it (looked for "
                           f"{', '.join(FOLDER_EXTENSIONS)}, recursively)")
    keys = [p.relative_to(folder).as_posix() for p in paths]
    return Gallery(keys, [str(p) for p in paths], [""] * len(paths), [UNKNOWN_PERSON] * len(paths), str(folder))


def decode(payload: bytes) -> Image.Image:
    """An RGB image, fully decoded (a truncated file fails here, not later)."""
    with Image.open(io.BytesIO(payload)) as image:
        image.load()
        return image.convert("RGB")


def subset(gallery: Gallery, rows: list[int]) -> Gallery:
    """The gallery restricted to `rows`, the others recorded as skipped."""
    kept = set(rows)
    skipped = gallery.skipped + [gallery.keys[i] for i in range(len(gallery)) if i not in kept]
    spans = None if gallery.spans is None else [gallery.spans[i] for i in rows]
    return Gallery([gallery.keys[i] for i in rows], [gallery.files[i] for i in rows],
                   [gallery.members[i] for i in rows], [gallery.person_ids[i] for i in rows], gallery.source, skipped,
                   spans)


def gallery_fingerprint(spec: str, prepared: str | Path = "data/prepared") -> str:
    """A digest of what the gallery holds, taken when the index is built.

    For a prepared split it covers the shard contents. For a folder it covers the image files by
    relative path, size and modification time, since hashing every file of a large folder would
    cost as much as reading it."""
    digest = hashlib.sha256(spec.encode() if spec in PREPARED_SPLITS else str(Path(spec)).encode())
    if spec in PREPARED_SPLITS:
        for shard in list_shards(prepared, spec):
            digest.update(Path(shard).name.encode())
            with open(shard, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()
    return _folder_stat_digest(spec)


def gallery_stat(spec: str, prepared: str | Path = "data/prepared") -> list[list] | str:
    """What a search compares with the index's record, without reading an image.

    - For a prepared split, its shards as [name, size, mtime_ns].
    - For a folder, a digest of its images' relative paths, sizes and modification times. That is one
      stat a file, not one record a file in index.json."""
    if spec in PREPARED_SPLITS:
        return [file_stat(shard) for shard in list_shards(prepared, spec)]
    return _folder_stat_digest(spec)


def file_stat(path: str | Path) -> list:
    """[name, size, mtime_ns]: a file rewritten, even with the same bytes, has another."""
    stat = os.stat(path)
    return [Path(path).name, stat.st_size, stat.st_mtime_ns]


def _folder_stat_digest(spec: str) -> str:
    folder = Path(spec).expanduser()
    digest = hashlib.sha256(str(Path(spec)).encode())
    for path in folder_images(folder) if folder.is_dir() else []:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def write_table(gallery: Gallery, path: Path) -> None:
    table = pa.table({"key": gallery.keys, "file": gallery.files, "member": gallery.members,
                      "person_id": gallery.person_ids, "source": [gallery.source] * len(gallery)},
                     schema=GALLERY_SCHEMA)
    with writing_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_table(path: Path) -> Gallery:
    table = pq.read_table(path, schema=GALLERY_SCHEMA).to_pydict()
    source = table["source"][0] if table["source"] else ""
    return Gallery(table["key"], table["file"], table["member"], table["person_id"], source)

