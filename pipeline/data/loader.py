"""Streaming (image, caption) pairs from WebDataset shards for contrastive training.

Every process reads the same seeded stream of raw samples (reading tar bytes is
cheap) and cuts it into the same global batches; each process then decodes and
augments only its own slice of each global batch, and loader workers take whole
batches in turn. So N processes see exactly the global batches one process
would see (the distributed loss then equals the single-process loss), and
resuming at step k just skips k global batches without decoding them.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.augment import AugmentConfig, augmented_tensor
from pipeline.data.canonical import image_member, iter_shard_samples
from pipeline.models.preprocessing import ImagePreprocessor

@dataclass(frozen=True)
class RawPair:
    index: int  # position in this epoch's stream: seeds the sample's augmentation
    key: str
    image_bytes: bytes
    caption: str
    person_id: int


@dataclass(frozen=True)
class StreamPlan:
    """Which global batches this process and epoch take, and how they are shuffled."""

    shards: tuple[str, ...]
    global_batch_size: int
    seed: int
    epoch: int = 0
    start_step: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle_buffer: int = 2000
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if self.global_batch_size % self.world_size:
            raise ValueError(
                f"global batch size {self.global_batch_size} is not divisible by {self.world_size} processes"
            )

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size


def _shuffled(items: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """A bounded-memory shuffle: a random element of a full buffer is emitted for each new one."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


def raw_pairs(plan: StreamPlan) -> Iterator[RawPair]:
    """The epoch's pair stream: shards in a seeded order, one pair per caption, buffer-shuffled."""
    rng = np.random.default_rng((plan.seed, plan.epoch))
    shard_order = [plan.shards[i] for i in rng.permutation(len(plan.shards))]

    def pairs() -> Iterator[tuple]:
        for shard in shard_order:
            for sample in iter_shard_samples([shard]):
                row = json.loads(sample["json"])
                image = image_member(sample, shard)
                for caption in row["captions"]:
                    yield sample["__key__"], image, caption, row["person_id"]

    for index, (key, image, caption, pid) in enumerate(_shuffled(pairs(), plan.shuffle_buffer, rng)):
        yield RawPair(index, key, image, caption, pid)


def global_batches(plan: StreamPlan) -> Iterator[tuple[int, list[RawPair]]]:
    """(step, pairs) for every full global batch from `start_step` on; a short last batch is dropped."""
    batch: list[RawPair] = []
    step = 0
    for pair in raw_pairs(plan):
        batch.append(pair)
        if len(batch) == plan.global_batch_size:
            if step >= plan.start_step:
                yield step, batch
            batch, step = [], step + 1


class ContrastivePairs(IterableDataset):
    """Yields this process's collated slice of each global batch (workers take batches in turn)."""

    def __init__(
        self, plan: StreamPlan, preprocessor: ImagePreprocessor, tokenize: Callable[[list[str]], dict],
        caption_transform: Callable[[str, np.random.Generator], str] | None = None,
    ):
        self.plan = plan
        self.preprocessor = preprocessor
        self.tokenize = tokenize
        self.caption_transform = caption_transform  # e.g. approximate text; seeded per pair

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        lo = self.plan.rank * self.plan.local_batch_size
        for step, batch in global_batches(self.plan):
            if (step - self.plan.start_step) % num_workers == worker_id:
                yield self.collate(step, batch[lo : lo + self.plan.local_batch_size])

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


def pair_loader(dataset: ContrastivePairs, num_workers: int) -> DataLoader:
    """Batches are made by the dataset itself; workers' outputs come back in round-robin order."""
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False)


def count_pairs(manifest_rows) -> int:
    return sum(len(row.captions) for row in manifest_rows)
