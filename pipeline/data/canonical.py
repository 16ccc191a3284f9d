"""The one canonical form every data source is turned into.

Per split, a parquet manifest with one row per image, and WebDataset tar shards
that carry the image bytes next to the same row as JSON, so training streams
from tars and never needs the source folder again.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.core.io import BrokenArtifact, rerun_hint, writing_file

SPLITS = ("train", "val", "test")

# Fixed tar metadata so that rebuilding a shard gives identical bytes.
_TAR_MTIME = 0
_TAR_USER = "tbps"


@dataclass(frozen=True)
class RawRecord:
    """One image of a source annotation file, before canonicalisation.

    `where` names the record for error messages: the annotation file and the
    record's index in it.
    """

    split: str
    captions: list[str]
    file_path: str  # relative to the data root
    original_id: int
    where: str
    attributes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ImageRecord:
    """One manifest row."""

    key: str  # unique across splits, safe as a file and tar member name
    person_id: int  # contiguous 0..n-1 within the split
    original_id: int  # the id in the source annotations
    split: str
    captions: list[str]
    image_path: str  # relative to the data root
    source: str
    width: int
    height: int
    attributes: str = ""  # JSON of ground-truth attributes (SynthPedes), "" for real data


MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("person_id", pa.int64()),
        ("original_id", pa.int64()),
        ("split", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("image_path", pa.string()),
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("attributes", pa.string()),
    ]
)


def image_key(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def assign_person_ids(raw: list[RawRecord], split: str) -> dict[int, int]:
    """Map original ids of one split to contiguous ids, in order of first appearance."""
    mapping: dict[int, int] = {}
    for record in raw:
        if record.split == split and record.original_id not in mapping:
            mapping[record.original_id] = len(mapping)
    return mapping


def write_manifest(records: list[ImageRecord], path: str | Path) -> None:
    columns = {name: [getattr(r, name) for r in records] for name in MANIFEST_SCHEMA.names}
    table = pa.table(columns, schema=MANIFEST_SCHEMA)
    with writing_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_manifest(path: str | Path) -> list[ImageRecord]:
    table = pq.read_table(path, schema=MANIFEST_SCHEMA)
    return [ImageRecord(**row) for row in table.to_pylist()]


def manifest_path(prepared_dir: str | Path, split: str) -> Path:
    return Path(prepared_dir) / "manifests" / f"{split}.parquet"


def shard_pattern(prepared_dir: str | Path, split: str) -> str:
    return str(Path(prepared_dir) / "shards" / f"{split}-%06d.tar")


def list_shards(prepared_dir: str | Path, split: str) -> list[str]:
    return sorted(str(p) for p in (Path(prepared_dir) / "shards").glob(f"{split}-*.tar"))


def record_to_json(record: ImageRecord) -> dict:
    return asdict(record)


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = _TAR_MTIME
    info.mode = 0o444
    info.uname = info.gname = _TAR_USER
    tar.addfile(info, io.BytesIO(payload))


def write_tar_atomic(path: str | Path, samples: Iterable[dict[str, bytes]]) -> int:
    """Write WebDataset samples ({"__key__": str, ext: bytes, ...}) to one tar.

    Written under a temporary name and renamed, so a killed writer never leaves a
    half shard under the final name. Returns the number of samples written.
    """
    count = 0
    with writing_file(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext in sorted(k for k in sample if k != "__key__"):
                _add_member(tar, f"{key}.{ext}", sample[ext])
            count += 1
    return count


@dataclass(frozen=True)
class WrittenShards:
    paths: list[str]
    converted_to_rgb: int  # images that were not RGB, written converted (as PNG)


def write_shards(
    records: list[ImageRecord], image_root: str | Path, prepared_dir: str | Path, split: str, shard_size: int
) -> list[str]:
    """Write the split's images and rows as tar shards of `shard_size` samples."""
    return write_split_shards(records, image_root, prepared_dir, split, shard_size).paths


def write_split_shards(
    records: list[ImageRecord], image_root: str | Path, prepared_dir: str | Path, split: str, shard_size: int
) -> WrittenShards:
    """`write_shards`, also counting the non-RGB images it converted to RGB."""
    paths, converted = [], []
    for start in range(0, len(records), shard_size):
        chunk = records[start : start + shard_size]
        path = shard_pattern(prepared_dir, split) % (start // shard_size)
        write_tar_atomic(path, (_sample(r, image_root, converted) for r in chunk))
        paths.append(path)
    return WrittenShards(paths, len(converted))


def rgb_image(image: Image.Image) -> Image.Image:
    """An image in RGB, as every reader would convert it, except that 16-bit greyscale is scaled to
    8 bits (PIL's own conversion clips it, turning most of such an image white)."""
    if image.mode.startswith("I;16"):
        levels = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def _sample(record: ImageRecord, image_root: str | Path, converted: list | None = None) -> dict[str, bytes]:
    image_file = Path(image_root) / record.image_path
    ext = image_file.suffix.lower().lstrip(".") or "png"
    ext = "jpg" if ext == "jpeg" else ext
    payload = image_file.read_bytes()
    with Image.open(io.BytesIO(payload)) as image:  # the header tells the mode
        # a mode or a format (bmp, gif, tiff) the readers do not take: written as RGB PNG, counted
        if image.mode != "RGB" or ext not in IMAGE_EXTENSIONS:
            buffer = io.BytesIO()
            rgb_image(image).save(buffer, format="PNG")  # lossless, and the same bytes every time
            payload, ext = buffer.getvalue(), "png"
            if converted is not None:
                converted.append(record.key)
    return {
        "__key__": record.key,
        ext: payload,
        "json": json.dumps(record_to_json(record), sort_keys=True).encode("utf-8"),
    }


IMAGE_EXTENSIONS = ("png", "jpg", "webp")


def image_member(sample: dict[str, bytes], where: str) -> bytes:
    """The image bytes of a shard sample; `where` (the shard) names it in the error."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"{where}: sample {sample['__key__']} has no image member ({', '.join(IMAGE_EXTENSIONS)})")


def iter_shard_samples(paths: Iterable[str]) -> Iterator[dict[str, bytes]]:
    """Read samples back from tar shards (grouping members by key), in file order. A truncated, empty
    or unreadable shard is a BrokenArtifact naming it (not a tarfile traceback)."""
    for path in paths:
        try:
            with tarfile.open(path, "r") as tar:
                current: dict[str, bytes] = {}
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if current and current["__key__"] != key:
                        yield current
                        current = {}
                    current["__key__"] = key
                    current[ext] = tar.extractfile(member).read()
                if current:
                    yield current
        except (tarfile.TarError, EOFError, OSError) as err:
            reason = " ".join(str(err).split()) or type(err).__name__  # tarfile's reasons span lines
            raise BrokenArtifact(f"{path}: not a readable tar shard ({reason}): "
                                 f"rerun the stage that writes it ({rerun_hint(path)})") from None
