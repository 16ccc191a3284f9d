"""(image, caption) pairs from tar shards for contrastive training, each byte read once an epoch.

An epoch is a seeded permutation of every (image, caption) pair of the training set, cut into global
batches. Batch b is the pairs at positions [b*B, (b+1)*B) of the permutation. A process of rank r takes
its slice of each global batch, and its loader workers take whole batches in turn. Each pair's members
are read straight from its shard by offset, through `ShardIndex`. That index is one scan of the tar
headers, made once per start on the main process and handed to the others. This gives four properties.

- N processes see exactly the global batches one process sees, for any N dividing the batch. So the
  distributed loss equals the single-process loss.
- An epoch reads each pair's bytes once across all ranks and workers. An image with c captions is read
  c times, once per pair. A stream that every worker scans would read R x N times the data set.
- Resuming at step k starts at batch k. Nothing before it is read.
- The shuffle is a full permutation. So a batch's identities are spread as by random draws, whatever
  order the shards are in. A shuffle buffer over shards in annotation order would keep neighbours
  together.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.augment import AugmentConfig, augmented_tensor
from pipeline.data.canonical import IMAGE_EXTENSIONS
from pipeline.core.io import BrokenArtifact, rerun_hint
from pipeline.models.preprocessing import ImagePreprocessor


@dataclass(frozen=True)
class RawPair:
    index: int  # position in this epoch's permutation: seeds the pair's augmentation
    key: str
    image_bytes: bytes
    caption: str
    person_id: int


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample's members lie in the shards, and each sample's identity and caption count.

    Arrays, not Python objects, so that loader workers forked from a process share them."""

    shards: tuple[str, ...]
    keys: np.ndarray  # str, per sample
    shard: np.ndarray  # int32, per sample: index into `shards`
    image_span: np.ndarray  # int64 [samples, 2]: byte offset and size of the image member
    json_span: np.ndarray  # int64 [samples, 2]: byte offset and size of the JSON row
    person_id: np.ndarray  # int64, per sample
    first_pair: np.ndarray  # int64 [samples + 1]: pairs of sample i are first_pair[i] .. first_pair[i+1]-1

    @property
    def num_pairs(self) -> int:
        return int(self.first_pair[-1])

    @property
    def num_bytes(self) -> int:
        """The bytes an epoch over every pair reads: per pair, its image and its JSON row."""
        per_sample = self.image_span[:, 1] + self.json_span[:, 1]
        return int((per_sample * np.diff(self.first_pair)).sum())

    def locate(self, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sample, caption number) of each pair number."""
        samples = np.searchsorted(self.first_pair, pairs, side="right") - 1
        return samples, pairs - self.first_pair[samples]


def _broken(path: str, reason: str) -> BrokenArtifact:
    return BrokenArtifact(f"{path}: not a readable tar shard ({reason}): "
                          f"rerun the stage that writes it ({rerun_hint(path)})")


_BLOCK = 512


class _NotPlainTar(Exception):
    """A member this scanner does not read (pax or GNU headers, links, base-256 sizes): tarfile reads it."""


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:
        raise _NotPlainTar("base-256 number")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _plain_members(fd: int, length: int) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each member of a plain USTAR tar, read from its 512-byte headers alone.

    Such a tar is what canonical.write_tar_atomic writes. This is three times faster than tarfile,
    which builds an object and parses every field of each header. A damaged or truncated shard raises
    ValueError."""
    members, offset = [], 0
    while True:
        header = os.pread(fd, _BLOCK, offset)
        if len(header) < _BLOCK:
            raise ValueError(f"unexpected end of data at byte {offset}")
        if header == bytes(_BLOCK):
            return members
        if _octal(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
            raise ValueError(f"bad header checksum at byte {offset}")
        if header[156:157] not in (b"0", b"\0"):
            raise _NotPlainTar(f"member type {header[156:157]!r}")
        name, prefix = header[:100].split(b"\0", 1)[0], header[345:500].split(b"\0", 1)[0]
        size = _octal(header[124:136])
        if offset + _BLOCK + size > length:
            raise ValueError(f"unexpected end of data in {name.decode(errors='replace')}")
        members.append(((prefix + b"/" + name if prefix else name).decode(), offset + _BLOCK, size))
        offset += _BLOCK + (size + _BLOCK - 1) // _BLOCK * _BLOCK


def _members(path: str) -> list[tuple[str, int, int]]:
    with open(path, "rb") as handle:
        try:
            return _plain_members(handle.fileno(), os.fstat(handle.fileno()).st_size)
        except _NotPlainTar:
            handle.seek(0)
            with tarfile.open(fileobj=handle, mode="r:") as tar:
                return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def build_shard_index(shards: Sequence[str]) -> ShardIndex:
    """Scan the shards' tar headers (and their small JSON rows, for identities and caption counts);
    image bytes are not read. A truncated or unreadable shard, or a sample without an image, is a
    BrokenArtifact naming the shard."""
    keys, shard_ids, image_spans, json_spans, person_ids, counts = [], [], [], [], [], []
    for number, path in enumerate(shards):
        try:
            members: dict[str, dict[str, tuple[int, int]]] = {}
            for name, offset, size in _members(path):
                key, _, ext = name.partition(".")
                members.setdefault(key, {})[ext] = (offset, size)
            with open(path, "rb") as handle:
                for key, found in members.items():
                    image = next((found[e] for e in IMAGE_EXTENSIONS if e in found), None)
                    if image is None or "json" not in found:
                        raise _broken(path, f"sample {key} lacks its image or JSON member")
                    row = json.loads(os.pread(handle.fileno(), found["json"][1], found["json"][0]))
                    keys.append(key)
                    shard_ids.append(number)
                    image_spans.append(image)
                    json_spans.append(found["json"])
                    person_ids.append(row["person_id"])
                    counts.append(len(row["captions"]))
        except (tarfile.TarError, EOFError, OSError, ValueError, KeyError) as err:
            reason = " ".join(str(err).split()) or type(err).__name__  # tarfile's reasons span lines
            raise _broken(path, reason) from None
    spans = (lambda rows: np.asarray(rows, dtype=np.int64).reshape(-1, 2))
    return ShardIndex(
        shards=tuple(shards), keys=np.asarray(keys, dtype=str), shard=np.asarray(shard_ids, dtype=np.int32),
        image_span=spans(image_spans), json_span=spans(json_spans), person_id=np.asarray(person_ids, dtype=np.int64),
        first_pair=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]),
    )


class ShardReader:
    """Reads byte ranges of the shards with pread (no shared file position), counting the bytes read;
    keeps at most `max_open` files open."""

    def __init__(self, shards: Sequence[str], max_open: int = 64):
        self.shards, self.max_open = tuple(shards), max_open
        self.open_files: dict[int, int] = {}
        self.bytes_read = 0

    def read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self.open_files.get(shard)
        if fd is None:
            if len(self.open_files) >= self.max_open:
                os.close(self.open_files.pop(next(iter(self.open_files))))
            fd = self.open_files[shard] = os.open(self.shards[shard], os.O_RDONLY)
        payload = os.pread(fd, int(size), int(offset))
        if len(payload) != size:
            raise _broken(self.shards[shard], f"ends before byte {offset + size}")
        self.bytes_read += len(payload)
        return payload

    def close(self) -> None:
        for fd in self.open_files.values():
            os.close(fd)
        self.open_files.clear()


@dataclass(frozen=True)
class StreamPlan:
    """Which global batches this process and epoch take."""

    global_batch_size: int
    seed: int
    epoch: int = 0
    start_step: int = 0
    rank: int = 0
    world_size: int = 1
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if self.global_batch_size % self.world_size:
            raise ValueError(
                f"global batch size {self.global_batch_size} is not divisible by {self.world_size} processes"
            )

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def steps(self, index: ShardIndex) -> int:
        """Full global batches in an epoch (a short last batch is dropped)."""
        return index.num_pairs // self.global_batch_size

    def permutation(self, index: ShardIndex) -> np.ndarray:
        return np.random.default_rng((self.seed, self.epoch)).permutation(index.num_pairs)

    def positions(self, step: int, local: bool = True) -> range:
        """Positions in the epoch's permutation of global batch `step` (of this rank's slice when `local`)."""
        start = step * self.global_batch_size
        if not local:
            return range(start, start + self.global_batch_size)
        start += self.rank * self.local_batch_size
        return range(start, start + self.local_batch_size)


def read_pairs(index: ShardIndex, reader: ShardReader, permutation: np.ndarray, positions: range) -> list[RawPair]:
    """The pairs at these positions of the epoch's permutation, read from their shards."""
    samples, captions = index.locate(permutation[positions.start : positions.stop])
    pairs = []
    for position, sample, caption in zip(positions, samples, captions):
        shard = index.shard[sample]
        row = json.loads(reader.read(shard, *index.json_span[sample]))
        pairs.append(RawPair(position, str(index.keys[sample]), reader.read(shard, *index.image_span[sample]),
                             row["captions"][caption], int(index.person_id[sample])))
    return pairs


def global_batches(plan: StreamPlan, index: ShardIndex) -> Iterator[tuple[int, list[RawPair]]]:
    """(step, pairs) of every full global batch from `start_step` on, whole (not this rank's slice)."""
    reader = ShardReader(index.shards)
    permutation = plan.permutation(index)
    try:
        for step in range(plan.start_step, plan.steps(index)):
            yield step, read_pairs(index, reader, permutation, plan.positions(step, local=False))
    finally:
        reader.close()


class ContrastivePairs(IterableDataset):
    """Yields this process's collated slice of each global batch (workers take batches in turn)."""

    def __init__(
        self, plan: StreamPlan, index: ShardIndex, preprocessor: ImagePreprocessor,
        tokenize: Callable[[list[str]], dict], caption_transform: Callable[[str, np.random.Generator], str] | None = None,
    ):
        self.plan = plan
        self.index = index
        self.preprocessor = preprocessor
        self.tokenize = tokenize
        self.caption_transform = caption_transform  # e.g. approximate text; seeded per pair
        self.bytes_read = 0  # by this process's iteration (a worker's own copy in a worker)

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        reader = ShardReader(self.index.shards)
        permutation = self.plan.permutation(self.index)
        try:
            for step in range(self.plan.start_step + worker_id, self.plan.steps(self.index), num_workers):
                pairs = read_pairs(self.index, reader, permutation, self.plan.positions(step))
                self.bytes_read = reader.bytes_read
                yield self.collate(step, pairs)
        finally:
            reader.close()

    def collate(self, step: int, pairs: list[RawPair]) -> dict:
        images = torch.stack([self._image(p) for p in pairs])
        tokens = self.tokenize([self._caption(p) for p in pairs])
        return {
            "step": step,
            "pixel_values": images,
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "person_ids": torch.tensor([p.person_id for p in pairs], dtype=torch.long),
        }

    def _caption(self, pair: RawPair) -> str:
        if self.caption_transform is None:
            return pair.caption
        return self.caption_transform(pair.caption, np.random.default_rng((self.plan.seed, self.plan.epoch, pair.index, 1)))

    def _image(self, pair: RawPair) -> torch.Tensor:
        image = Image.open(io.BytesIO(pair.image_bytes))
        if self.plan.augment is None:
            return self.preprocessor(image)
        rng = np.random.default_rng((self.plan.seed, self.plan.epoch, pair.index))
        return augmented_tensor(self.preprocessor, image, rng, self.plan.augment)


def pair_loader(dataset: ContrastivePairs, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches are made by the dataset itself. Workers' outputs come back in round-robin order, which
    is step order. Workers are forked per epoch. The index is numpy arrays, so it is shared, not
    copied, and persistent workers would save only a fork. Pass `pin_memory` where batches go to a
    GPU."""
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      pin_memory=pin_memory)


def count_pairs(manifest_rows) -> int:
    return sum(len(row.captions) for row in manifest_rows)
