"""Scores generated proximity pairs and keeps the good ones (`filter` stage).

Every pair gets four scores, each against its own param.
- Consistency, under a scorer (the baseline dual encoder, or a CLIP). The generated image must match
  its edited caption better than the source caption, and match the edited caption well enough. Each
  test uses a threshold calibrated on the scorer's behaviour on real training pairs, at
  `margin_level` and `similarity_level` (pipeline/pdg/calibration.py).
- Fidelity. This is the mean absolute pixel change (0-255) between the generated and the source
  image, over the least-changed (1 - EDIT_AREA) of the pixels. So the edited garment itself is left
  out whatever the method, and no mask is needed.
- Not degenerate. Pixel standard deviation catches blank images. The share of the image's energy in
  its finest details catches pure noise.
- Near-duplicates. Among kept pairs from the same source image, a pair is dropped when its pixels
  differ from an earlier kept one's by less than `duplicate_change` (mean, grey levels). Exact pixel
  duplicates anywhere are dropped too.

benchmarks/bench_filter_truth.py measures how well the filter tells right edits from known-bad ones,
against SynthPedes' ground truth.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipeline.core.config import FilterConfig
from pipeline.data.canonical import iter_shard_samples, write_tar_atomic
from pipeline.pdg.calibration import Calibration
from pipeline.pdg.shards import SHARD_NAME
from pipeline.pdg.scorers import Scorer

log = logging.getLogger(__name__)

EDIT_AREA = 0.3  # share of a crop a garment colour edit may cover; the rest must stay as it was
REASONS = ("consistency_margin", "consistency_similarity", "fidelity", "blank", "noise", "duplicate")


# ------------------------------------------------------------------ pixel statistics


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def pixel_std(image: Image.Image) -> float:
    """Standard deviation of the pixels, per colour channel, averaged: 0 for any flat image (a flat red
    one too, whose values differ between channels but not between pixels)."""
    return float(_array(image).std(axis=(0, 1)).mean())


def noise_share(image: Image.Image) -> float:
    """Share of the variance left after a 3x3 box blur: near 0 for smooth images, ~0.9 for white noise."""
    pixels = _array(image).mean(axis=2)
    padded = np.pad(pixels, 1, mode="edge")
    blurred = sum(padded[dy : dy + pixels.shape[0], dx : dx + pixels.shape[1]] for dy in range(3) for dx in range(3)) / 9
    total = ((pixels - pixels.mean()) ** 2).mean()
    return float(((pixels - blurred) ** 2).mean() / total) if total > 1e-6 else 0.0


def outside_change(generated: Image.Image, source: Image.Image, edit_area: float = EDIT_AREA) -> float:
    """Mean |generated - source| (0-255, RGB averaged) over the least-changed (1 - edit_area) pixels."""
    source = source.convert("RGB").resize(generated.size, Image.Resampling.BICUBIC)
    change = np.abs(_array(generated) - _array(source)).mean(axis=2).ravel()
    keep = max(1, int(round((1 - edit_area) * change.size)))
    return float(np.partition(change, keep - 1)[:keep].mean())


# ------------------------------------------------------------------ scoring and decisions


@dataclass
class ScoredPair:
    key: str
    record: dict
    members: dict[str, bytes]
    scores: dict[str, float]
    reasons: list[str] = field(default_factory=list)

    @property
    def kept(self) -> bool:
        return not self.reasons


def score_batch(
    samples: list[dict[str, bytes]], sources: dict[str, bytes], scorer: Scorer, calibration: Calibration
) -> list[ScoredPair]:
    records = [json.loads(s["json"]) for s in samples]
    images = [Image.open(io.BytesIO(s["png"])).convert("RGB") for s in samples]
    originals = [Image.open(io.BytesIO(sources[r["source_key"]])).convert("RGB") for r in records]
    image_emb = scorer.embed_images(images)
    edited_emb = scorer.embed_texts([r["edited_caption"] for r in records])
    source_emb = scorer.embed_texts([r["source_caption"] for r in records])
    edited_sim = (image_emb * edited_emb).sum(-1).tolist()
    source_sim = (image_emb * source_emb).sum(-1).tolist()
    pairs = []
    for i, (sample, record) in enumerate(zip(samples, records)):
        scores = {
            "edited_similarity": edited_sim[i],
            "source_similarity": source_sim[i],
            "margin": edited_sim[i] - source_sim[i],
            "consistency_score": calibration.consistency_score(edited_sim[i] - source_sim[i], edited_sim[i]),
            "outside_change": outside_change(images[i], originals[i]),
            "pixel_std": pixel_std(images[i]),
            "noise_share": noise_share(images[i]),
        }
        pairs.append(ScoredPair(sample["__key__"], record, sample, scores))
    return pairs


def judge(pair: ScoredPair, cfg: FilterConfig, calibration: Calibration) -> list[str]:
    """Every criterion the pair fails (duplicates are judged afterwards, among kept pairs)."""
    s = pair.scores
    failed = []
    if s["margin"] < calibration.margin_threshold:
        failed.append("consistency_margin")
    if s["edited_similarity"] < calibration.similarity_threshold:
        failed.append("consistency_similarity")
    if s["outside_change"] > cfg.max_outside_change:
        failed.append("fidelity")
    if s["pixel_std"] < cfg.min_pixel_std:
        failed.append("blank")
    if s["noise_share"] > cfg.max_noise_share:
        failed.append("noise")
    return failed


def mark_duplicates(pairs: list[ScoredPair], max_change: float) -> None:
    """Among kept pairs, in order, exact pixel copies anywhere and near copies of the same source.

    A near copy has a mean |difference| below `max_change` grey levels from an earlier kept pair of
    that source. Images are decoded here from the PNG each pair already holds, and only for kept
    pairs. So no decoded copy of every generated image is kept alongside its bytes."""
    seen_pixels: set[str] = set()
    kept_by_source: dict[str, list[ScoredPair]] = {}
    for pair in pairs:
        if not pair.kept:
            continue
        digest = hashlib.sha256(pair.members["png"]).hexdigest()
        earlier = kept_by_source.setdefault(pair.record["source_key"], [])
        pixels = _decoded(pair)
        others = (other for other in map(_decoded, earlier) if other.shape == pixels.shape)
        closest = min((float(np.abs(pixels - other).mean()) for other in others), default=255.0)
        pair.scores["closest_kept_change"] = closest
        if digest in seen_pixels or closest < max_change:
            pair.reasons.append("duplicate")
            continue
        seen_pixels.add(digest)
        earlier.append(pair)


def _decoded(pair: ScoredPair) -> np.ndarray:
    return _array(Image.open(io.BytesIO(pair.members["png"])))


@dataclass
class FilterReport:
    pairs_in: int
    kept: int
    rejected: int
    failed_by_reason: dict[str, int]
    rejected_by_first_reason: dict[str, int]
    enabled: bool
    score_means: dict[str, float]
    score_quantiles: dict[str, dict[str, float]] = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "pairs_in": self.pairs_in, "kept": self.kept, "rejected": self.rejected,
            "acceptance_rate": round(self.kept / self.pairs_in, 4) if self.pairs_in else 0.0,
            "filter_enabled": self.enabled,
            "failed_by_reason": self.failed_by_reason,
            "rejected_by_first_reason": self.rejected_by_first_reason,
            "score_means": {k: round(v, 4) for k, v in self.score_means.items()},
            "score_quantiles": {name: {k: round(v, 4) for k, v in q.items()} for name, q in self.score_quantiles.items()},
            "calibration": self.calibration,
        }


def filter_pairs(
    samples: list[dict[str, bytes]], sources: dict[str, bytes], scorer: Scorer, cfg: FilterConfig,
    calibration: Calibration, show_progress: bool = True,
) -> list[ScoredPair]:
    """Scores and judges every generated pair (from `read_generated`), in order."""
    pairs: list[ScoredPair] = []
    for start in tqdm(range(0, len(samples), cfg.batch_size), desc="filter", unit="batch", disable=not show_progress):
        pairs += score_batch(samples[start : start + cfg.batch_size], sources, scorer, calibration)
    for pair in pairs:
        pair.reasons = judge(pair, cfg, calibration)
    mark_duplicates(pairs, cfg.duplicate_change)
    return pairs


def referenced_sources(samples: list[dict[str, bytes]]) -> set[str]:
    """Keys of the source images the generated samples were made from."""
    return {json.loads(sample["json"])["source_key"] for sample in samples}


def read_generated(shards: list[str]) -> list[dict[str, bytes]]:
    """Every generated sample of the shards; a sample without its png or json stops with its key."""
    samples = list(iter_shard_samples(shards))
    for sample in samples:
        if "png" not in sample or "json" not in sample:
            raise ValueError(f"generated sample {sample['__key__']} lacks its png or json member")
    return samples


def summarise(pairs: list[ScoredPair], enabled: bool, calibration: Calibration) -> FilterReport:
    failed = Counter(reason for pair in pairs for reason in pair.reasons)
    first = Counter(pair.reasons[0] for pair in pairs if pair.reasons)
    rejected = sum(not written(pair, enabled) for pair in pairs)
    means = {name: float(np.mean([p.scores[name] for p in pairs])) for name in
             ("edited_similarity", "source_similarity", "margin", "outside_change", "pixel_std", "noise_share")} if pairs else {}
    return FilterReport(len(pairs), len(pairs) - rejected, rejected, {r: failed.get(r, 0) for r in REASONS},
                        {r: first.get(r, 0) for r in REASONS}, enabled, means,
                        {name: quantiles([p.scores[name] for p in pairs]) for name in QUANTILE_SCORES} if pairs else {},
                        calibration.to_json())


# The scores reported as quantiles over all pairs, kept or not: both consistency similarities,
# their margin (beside the calibration's thresholds) and the fidelity score (change outside the edit).
QUANTILE_SCORES = ("edited_similarity", "source_similarity", "margin", "outside_change")
QUANTILES = {"min": 0.0, "p05": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95, "max": 1.0}


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """min, p05, p25, median, p75, p95, max of `values` (linear interpolation between order statistics)."""
    points = np.quantile(np.asarray(values, dtype=np.float64), list(QUANTILES.values()))
    return {name: float(value) for name, value in zip(QUANTILES, points)}


def written(pair: ScoredPair, enabled: bool) -> bool:
    """Whether the pair goes on to the caption stage: kept, or any pair when the filter is off."""
    return pair.kept or not enabled


def write_kept(pairs: list[ScoredPair], out_dir: str | Path, shard_size: int, enabled: bool = True) -> int:
    """Kept pairs (every pair when the filter is off) as shards; each json gains its scores."""
    chosen = [p for p in pairs if written(p, enabled)]
    for index, start in enumerate(range(0, len(chosen), shard_size)):
        write_tar_atomic(Path(out_dir) / (SHARD_NAME % index), (_with_scores(p) for p in chosen[start : start + shard_size]))
    return len(chosen)


def _with_scores(pair: ScoredPair) -> dict[str, bytes]:
    record = {**pair.record, "filter_scores": {k: round(v, 5) for k, v in pair.scores.items()}, "filter_failed": pair.reasons}
    return {**pair.members, "json": json.dumps(record, sort_keys=True).encode()}
