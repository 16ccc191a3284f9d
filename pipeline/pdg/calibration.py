"""The filter's consistency thresholds, calibrated on the scorer's own behaviour on real pairs.

A scorer's cosines have no fixed scale. A dual encoder trained at temperature 0.005 spreads its
similarities over a tenth of the range that one trained at 0.07 does, and a CLIP differs again. So
the filter states its thresholds as levels of distributions that the scorer itself produces on real
training pairs. The filter stage measures two of them.
- The *preference* of a real image for its true caption over a colour-edited one is
  s(image, caption) - s(image, edited caption). This is the colour sensitivity `evaluate` reports.
  A generated image must prefer its edited caption over its source caption, measured as
  s(generated, edited) - s(generated, source). It must do so at least as much as real images do at
  `filter.margin_level` of theirs. The default 0.05 means the least convincing 5% of real pairs.
- The *similarity* of a real image to its true caption is the other. The generated image's
  similarity to its edited caption must reach `filter.similarity_level` of those.

Levels are invariant to any increasing affine change of the cosines, such as a temperature or a
cosine scale. The same pairs pass. A pair's `consistency_score` is its smaller slack over the two
thresholds, in units of the real distribution's spread (interquartile range). A positive score
passes. The score ranks pairs the same way under any scorer scale, so the ground-truth benchmark's
ROC AUC does not depend on it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.config import FilterConfig
from pipeline.data.canonical import ImageRecord, manifest_path, read_manifest
from pipeline.pdg.scorers import Scorer
from pipeline.pdg.shards import load_source_images
from pipeline.text import find_color_phrases
from pipeline.text.caption_edit import edit_captions

SEED = 0  # which real pairs calibrate: fixed, so a scorer alone decides the thresholds
LEVELS = {"min": 0.0, "p05": 0.05, "p10": 0.1, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95, "max": 1.0}


@dataclass(frozen=True)
class RealPair:
    record: ImageRecord
    caption: str  # the image's own caption
    edited: str  # that caption with one colour changed


def real_pairs(rows: list[ImageRecord], count: int, seed: int = SEED) -> list[RealPair]:
    """Up to `count` training images (seeded order), each with its first caption (seeded) that has an
    editable colour phrase and one colour edit of it."""
    rng = np.random.default_rng([seed, 0])
    chosen: list[tuple[ImageRecord, str]] = []
    for index in rng.permutation(len(rows)):
        row = rows[index]
        caption = next((row.captions[i] for i in rng.permutation(len(row.captions))
                        if find_color_phrases(row.captions[i])), None)
        if caption is not None:
            chosen.append((row, caption))
            if len(chosen) == count:
                break
    edits = edit_captions([caption for _, caption in chosen], 1, seed)
    return [RealPair(row, caption, found[0].edited) for (row, caption), found in zip(chosen, edits) if found]


@dataclass(frozen=True)
class Calibration:
    preference: np.ndarray  # s(image, caption) - s(image, edited caption), one per real pair
    similarity: np.ndarray  # s(image, caption)
    margin_level: float
    similarity_level: float

    @property
    def margin_threshold(self) -> float:
        return float(np.quantile(self.preference, self.margin_level))

    @property
    def similarity_threshold(self) -> float:
        return float(np.quantile(self.similarity, self.similarity_level))

    def consistency_score(self, margin: float, similarity: float) -> float:
        """The smaller slack over the two thresholds, each in its real distribution's spread (IQR)."""
        return min((margin - self.margin_threshold) / _spread(self.preference),
                   (similarity - self.similarity_threshold) / _spread(self.similarity))

    def to_json(self) -> dict:
        return {
            "real_pairs": int(self.preference.size),
            "margin_level": self.margin_level, "margin_threshold": round(self.margin_threshold, 5),
            "similarity_level": self.similarity_level, "similarity_threshold": round(self.similarity_threshold, 5),
            "preferred_share": round(float((self.preference > 0).mean()), 4),  # images preferring their caption
            "preference": _levels(self.preference), "similarity": _levels(self.similarity),
        }


def _spread(values: np.ndarray) -> float:
    q25, q75 = np.quantile(values, [0.25, 0.75])
    return float(q75 - q25) or float(np.abs(values).max()) or 1.0


def _levels(values: np.ndarray) -> dict[str, float]:
    return {name: round(float(v), 5) for name, v in zip(LEVELS, np.quantile(values, list(LEVELS.values())))}


def calibrate(scorer: Scorer, pairs: list[RealPair], images: dict[str, bytes], cfg: FilterConfig) -> Calibration:
    """The scorer's preference and similarity over the real pairs (`images`: encoded, by record key)."""
    if not pairs:
        raise ValueError("no training caption with an editable colour phrase: nothing to calibrate the filter on")
    preference, similarity = [], []
    for start in range(0, len(pairs), cfg.batch_size):
        batch = pairs[start : start + cfg.batch_size]
        image_emb = scorer.embed_images([Image.open(io.BytesIO(images[p.record.key])).convert("RGB") for p in batch])
        own = (image_emb * scorer.embed_texts([p.caption for p in batch])).sum(-1)
        edited = (image_emb * scorer.embed_texts([p.edited for p in batch])).sum(-1)
        preference += (own - edited).tolist()
        similarity += own.tolist()
    return Calibration(np.array(preference), np.array(similarity), cfg.margin_level, cfg.similarity_level)


def calibrate_on_prepared(scorer: Scorer, prepared: str | Path, cfg: FilterConfig) -> Calibration:
    """`calibrate` on `filter.calibration_pairs` real pairs of the prepared train split."""
    pairs = real_pairs(read_manifest(manifest_path(prepared, "train")), cfg.calibration_pairs)
    return calibrate(scorer, pairs, load_source_images(prepared, {p.record.key for p in pairs}), cfg)
