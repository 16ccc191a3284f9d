"""Turns kept proximity pairs into training pairs (`caption` stage).

Texts per generated image: its edited caption; optionally a caption from an image-to-text model
(real profile); optionally paraphrases by approximate text generation. Identity: a generated
person is a new identity, since its clothes changed; every sample made by the same edit of the
same source person (same garment phrase, same new colour) shares it.

The output folder is training-ready: the original training shards (hard links, or copies) plus
the proximity shards, and one manifest listing both, so `train@pdg` reads one folder the way
`train@baseline` reads data/prepared.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import CaptionConfig
from pipeline.data.canonical import (
    ImageRecord,
    iter_shard_samples,
    list_shards,
    manifest_path,
    record_to_json,
    shard_pattern,
    write_manifest,
    write_tar_atomic,
)
from pipeline.text.approximate import ApproximateText, lexicon_neighbours

log = logging.getLogger(__name__)


def edit_signature(record: dict) -> tuple:
    """What makes two samples the same new person: the source person and the colour changes."""
    changes = sorted((c["phrase_before"].lower(), c["new_color"]) for c in record["changes"])
    return (record["source_person_id"], tuple(changes))


def assign_identities(records: Sequence[dict], first_id: int) -> list[int]:
    """New person ids from `first_id` on, in order of first appearance of each edit signature."""
    ids: dict[tuple, int] = {}
    return [ids.setdefault(edit_signature(r), first_id + len(ids)) for r in records]


def paraphrases(caption: str, count: int, fraction: float, seed: int, key: str,
                perturb: ApproximateText | None = None) -> list[str]:
    """Up to `count` distinct approximate-text variants of `caption` (never the caption itself)."""
    if count == 0:
        return []
    perturb = perturb or ApproximateText(1.0, fraction, neighbours=lexicon_neighbours())
    rng = np.random.default_rng([seed, *key.encode()])
    found: list[str] = []
    for _ in range(4 * count):  # a short caption may have few distinct variants
        text = perturb(caption, rng)
        if text != caption and text not in found:
            found.append(text)
        if len(found) == count:
            break
    return found


class ImageCaptioner:
    """An image-to-text model (folder or hub id) loaded with the Auto classes (BLIP, GIT, ...)."""

    def __init__(self, path: str, max_tokens: int, device: torch.device | str = "cpu"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path).eval().to(device)
        self.max_tokens, self.device = max_tokens, device

    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=self.max_tokens, do_sample=False)
        return [text.strip() for text in self.processor.batch_decode(output, skip_special_tokens=True)]


def proximity_records(
    samples: Sequence[dict[str, bytes]], first_id: int, cfg: CaptionConfig,
    captioner: ImageCaptioner | None = None, perturb: ApproximateText | None = None,
) -> list[ImageRecord]:
    """One manifest row per kept sample, texts and identity assigned."""
    records = [json.loads(s["json"]) for s in samples]
    perturb = perturb or ApproximateText(1.0, cfg.paraphrase_fraction, neighbours=lexicon_neighbours())
    machine_captions = _machine_captions(samples, captioner, cfg.batch_size)
    rows = []
    for sample, record, person_id, machine in zip(samples, records, assign_identities(records, first_id), machine_captions):
        texts = [record["edited_caption"]]
        texts += paraphrases(record["edited_caption"], cfg.paraphrases, cfg.paraphrase_fraction, cfg.seed,
                             sample["__key__"], perturb)
        if machine and machine not in texts:
            texts.append(machine)
        width, height = Image.open(io.BytesIO(sample["png"])).size
        rows.append(ImageRecord(
            key=sample["__key__"], person_id=person_id, original_id=-1, split="train", captions=texts,
            image_path="", source=f"pdg-{record['method']}", width=width, height=height,
        ))
    return rows


def _machine_captions(samples: Sequence[dict[str, bytes]], captioner: ImageCaptioner | None, batch_size: int) -> list[str]:
    if captioner is None:
        return [""] * len(samples)
    texts = []
    for start in range(0, len(samples), batch_size):
        images = [Image.open(io.BytesIO(s["png"])).convert("RGB") for s in samples[start : start + batch_size]]
        texts += captioner(images)
    return texts


def write_training_set(
    prepared_dir: str | Path, original_rows: Sequence[ImageRecord], proximity: Sequence[dict[str, bytes]],
    rows: Sequence[ImageRecord], out_dir: str | Path, shard_size: int,
) -> dict[str, int]:
    """The original train shards and rows (`original_rows`: prepared_dir's train manifest), then the
    proximity shards and rows, in `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    originals = list_shards(prepared_dir, "train")
    for index, shard in enumerate(originals):
        _link_or_copy(Path(shard), Path(shard_pattern(out_dir, "train") % index))
    by_key = {row.key: row for row in rows}
    for number, start in enumerate(range(0, len(proximity), shard_size), start=len(originals)):
        chunk = proximity[start : start + shard_size]
        write_tar_atomic(shard_pattern(out_dir, "train") % number, (_training_sample(s, by_key[s["__key__"]]) for s in chunk))
    write_manifest([*original_rows, *rows], manifest_path(out_dir, "train"))
    return {"original_images": len(original_rows), "proximity_images": len(rows),
            "proximity_identities": len({row.person_id for row in rows}),
            "proximity_captions": sum(len(row.captions) for row in rows)}


def _training_sample(sample: dict[str, bytes], row: ImageRecord) -> dict[str, bytes]:
    """The canonical row plus the key of the training image it was edited from (see the loader's
    `batch_with_source`)."""
    source_key = json.loads(sample["json"])["source_key"]
    fields = {**record_to_json(row), "source_key": source_key}
    return {"__key__": row.key, "png": sample["png"], "json": json.dumps(fields, sort_keys=True).encode("utf-8")}


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def read_kept(shards: Iterable[str]) -> list[dict[str, bytes]]:
    return list(iter_shard_samples(list(shards)))
