"""Turns kept proximity pairs into training pairs (`caption` stage).

Each generated image gets these texts.
- Its edited caption.
- Optionally, a caption from an image-to-text model (real profile). A caption that gives the edited
  garment its old colour contradicts the edit and is dropped.
- Optionally, paraphrases by approximate text generation.

A generated person is a new identity, since its clothes changed. Every sample made by the same edit
of the same source person (same garment phrase, same new colour) shares that identity.

The output folder is training-ready. It holds the original training shards (hard links, or copies),
the proximity shards, and one manifest listing both. So `train@pdg` reads one folder the way
`train@baseline` reads data/prepared.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.core.config import CaptionConfig
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
from pipeline.core.hub import pretrained_kwargs
from pipeline.core.io import writing_directory
from pipeline.pdg.crops import padded, processor_fill
from pipeline.core.devices import inference_dtype
from pipeline.text import find_color_phrases
from pipeline.text.approximate import ApproximateText, lexicon_neighbours
from pipeline.text.lexicon import COLOR_FAMILY

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
    """An image-to-text model (folder or hub id) loaded with the Auto classes (BLIP, GIT, ...).
    Every crop is padded to a square first (`pipeline.pdg.crops`). BLIP's processor resizes to a
    square without keeping the aspect, which would stretch a person crop 2-3x sideways."""

    def __init__(self, path: str, max_tokens: int, device: torch.device | str = "cpu"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = torch.device(device)
        self.processor = AutoProcessor.from_pretrained(path, **pretrained_kwargs(path))
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=inference_dtype(self.device),
                                                                 **pretrained_kwargs(path))
        self.model = self.model.eval().to(self.device)
        self.max_tokens, self.fill = max_tokens, processor_fill(self.processor)

    def inputs(self, images: Sequence[Image.Image]):
        """The processor's inputs for the crops, each padded to a square on the processor's mean colour."""
        inputs = self.processor(images=padded(images, self.fill), return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        with torch.no_grad():
            output = self.model.generate(**self.inputs(images), max_new_tokens=self.max_tokens, do_sample=False)
        return [text.strip() for text in self.processor.batch_decode(output, skip_special_tokens=True)]


Captioner = Callable[[Sequence[Image.Image]], list[str]]  # an ImageCaptioner, or any stand-in


def proximity_rows(
    samples: Sequence[dict[str, bytes]], first_id: int, cfg: CaptionConfig,
    captioner: Captioner | None = None, perturb: ApproximateText | None = None,
) -> tuple[list[ImageRecord], dict[str, int]]:
    """One manifest row per kept sample, texts and identity assigned, and what became of the machine
    captions: how many were added to a row's texts, and how many were dropped for naming the
    edited garment's old colour."""
    records = [json.loads(s["json"]) for s in samples]
    perturb = perturb or ApproximateText(1.0, cfg.paraphrase_fraction, neighbours=lexicon_neighbours())
    machine_captions = _machine_captions(samples, captioner, cfg.batch_size)
    rows, counts = [], {"machine_captions_added": 0, "machine_captions_dropped_contradicting": 0}
    for sample, record, person_id, machine in zip(samples, records, assign_identities(records, first_id), machine_captions):
        texts = [record["edited_caption"]]
        texts += paraphrases(record["edited_caption"], cfg.paraphrases, cfg.paraphrase_fraction, cfg.seed,
                             sample["__key__"], perturb)
        if machine and contradicts_edit(machine, record["changes"]):
            counts["machine_captions_dropped_contradicting"] += 1
        elif machine and machine not in texts:
            texts.append(machine)
            counts["machine_captions_added"] += 1
        width, height = Image.open(io.BytesIO(sample["png"])).size
        rows.append(ImageRecord(
            key=sample["__key__"], person_id=person_id, original_id=-1, split="train", captions=texts,
            image_path="", source=f"pdg-{record['method']}", width=width, height=height,
        ))
    return rows, counts


def _machine_captions(samples: Sequence[dict[str, bytes]], captioner: Captioner | None, batch_size: int) -> list[str]:
    if captioner is None:
        return [""] * len(samples)
    texts = []
    for start in range(0, len(samples), batch_size):
        images = [Image.open(io.BytesIO(s["png"])).convert("RGB") for s in samples[start : start + batch_size]]
        texts += captioner(images)
    return texts


# ------------------------------------------------------------------ machine captions against the edit

# Garment words a captioner uses for the same garment as the caption's word (the lexicon has no
# garment synonyms): each maps to one key. Besides these, a noun is matched by its head word
# ("t-shirt", "tank top": "shirt", "top") with a plural s dropped.
SAME_GARMENT = {
    "tshirt": "shirt", "teeshirt": "shirt", "tee": "shirt",
    "trouser": "pant", "slack": "pant",
    "sneaker": "shoe", "trainer": "shoe",
    "hoody": "hoodie",
}


def garment_key(noun: str) -> str:
    """What two garment nouns share when they name the same garment: the head word, singular,
    through SAME_GARMENT ("Red T-Shirts" -> "shirt", "trousers" -> "pant")."""
    head = re.split(r"[\s-]+", noun.strip().lower())[-1]
    if head.endswith("sses"):
        head = head[:-2]
    elif head.endswith("s") and not head.endswith("ss"):
        head = head[:-1]
    return SAME_GARMENT.get(head, head)


def _families(text: str) -> set[str]:
    return {COLOR_FAMILY[word] for word in re.findall(r"[a-z]+", text.lower()) if word in COLOR_FAMILY}


def contradicts_edit(caption: str, changes: Sequence[dict]) -> bool:
    """Whether `caption` gives an edited garment its old colour.

    It does when it has a colour phrase (found by the project's parser) whose noun is the edited
    garment's (`garment_key`) and which names the old colour's family. The exception is an edited
    phrase that still has that colour, i.e. a multi-colour phrase where another mention shares it."""
    phrases = find_color_phrases(caption, allow_hair=True)
    for change in changes:
        edited = find_color_phrases(change["phrase_after"], allow_hair=True)
        if not edited:
            continue
        old = change.get("old_color")
        old_families = _families(old) if old else _families(change["phrase_before"]) - _families(change["phrase_after"])
        gone = old_families - edited[0].families
        noun = garment_key(edited[0].noun)
        if any(garment_key(p.noun) == noun and p.families & gone for p in phrases):
            return True
    return False


def write_training_set(
    prepared_dir: str | Path, original_rows: Sequence[ImageRecord], proximity: Sequence[dict[str, bytes]],
    rows: Sequence[ImageRecord], out_dir: str | Path, shard_size: int,
) -> dict[str, int]:
    """The original train shards and rows (`original_rows`: prepared_dir's train manifest), then the
    proximity shards and rows, in `out_dir` (written whole under a staging name, then swapped in)."""
    with writing_directory(out_dir) as staging:
        originals = list_shards(prepared_dir, "train")
        for index, shard in enumerate(originals):
            _link_or_copy(Path(shard), Path(shard_pattern(staging, "train") % index))
        by_key = {row.key: row for row in rows}
        for number, start in enumerate(range(0, len(proximity), shard_size), start=len(originals)):
            chunk = proximity[start : start + shard_size]
            write_tar_atomic(shard_pattern(staging, "train") % number,
                             (_training_sample(s, by_key[s["__key__"]]) for s in chunk))
        write_manifest([*original_rows, *rows], manifest_path(staging, "train"))
    return {"original_images": len(original_rows), "proximity_images": len(rows),
            "proximity_identities": len({row.person_id for row in rows}),
            "proximity_captions": sum(len(row.captions) for row in rows)}


def _training_sample(sample: dict[str, bytes], row: ImageRecord) -> dict[str, bytes]:
    """The canonical row plus the key of the training image it was edited from (its provenance)."""
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
