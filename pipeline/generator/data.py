"""The generator's training images: a prepared split at its resolution, with captions and colour labels."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pipeline.data.canonical import iter_shard_samples, list_shards

log = logging.getLogger(__name__)


@dataclass
class LabelledImages:
    """One split at the generator's resolution: pixels in [-1, 1], captions and attributes per image."""

    pixels: torch.Tensor  # (images, 3, height, width)
    captions: list[list[str]]
    attributes: list[dict[str, str]]

    def __len__(self) -> int:
        return len(self.captions)

    def __add__(self, other: LabelledImages) -> LabelledImages:
        return LabelledImages(torch.cat([self.pixels, other.pixels]), self.captions + other.captions,
                              self.attributes + other.attributes)

def load_images(prepared_dir: str | Path, split: str, height: int, width: int) -> LabelledImages:
    """Reads a split from its shards (self-contained: the source folder is not needed)."""
    images = labelled_images((_decoded(sample) for sample in iter_shard_samples(list_shards(prepared_dir, split))),
                             height, width)
    if not len(images):
        raise ValueError(f"no {split} images in {prepared_dir}")
    return images


def _decoded(sample: dict) -> tuple[Image.Image, list[str], dict[str, str]]:
    row = json.loads(sample["json"])
    image_bytes = next(sample[ext] for ext in ("png", "jpg", "webp") if ext in sample)
    attributes = json.loads(row["attributes"]) if row.get("attributes") else {}
    return Image.open(io.BytesIO(image_bytes)), list(row["captions"]), attributes


def labelled_images(
    samples: Iterable[tuple[Image.Image, list[str], dict[str, str]]], height: int, width: int
) -> LabelledImages:
    """(image, captions, attributes) triples at the generator's resolution."""
    pixels, captions, attributes = [], [], []
    for image, image_captions, image_attributes in samples:
        image = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        pixels.append(_to_tensor(image))
        captions.append(image_captions)
        attributes.append(image_attributes)
    stacked = torch.stack(pixels) if pixels else torch.empty(0, 3, height, width)
    return LabelledImages(stacked, captions, attributes)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1

def load_grid_images(prepared_dir: str | Path, split: str, height: int, width: int, count: int) -> LabelledImages:
    """`count` images spread over a split (by its manifest), for a sample grid, without decoding
    the rest of the split."""
    from pipeline.data.canonical import manifest_path, read_manifest

    rows = read_manifest(manifest_path(prepared_dir, split))
    if not rows:
        raise ValueError(f"no {split} images in {prepared_dir}")
    keys = [rows[i * len(rows) // count].key for i in range(min(count, len(rows)))]
    found = {s["__key__"]: s for s in iter_shard_samples(list_shards(prepared_dir, split)) if s["__key__"] in keys}
    missing = [key for key in keys if key not in found]
    if missing:
        raise ValueError(f"{split} image {missing[0]} of the manifest is not in the shards of {prepared_dir}")
    return labelled_images((_decoded(found[key]) for key in keys), height, width)
