"""Building a variant's index (the `index@<variant>` stage): embed the gallery, index it, measure it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.config import Params
from pipeline.models import trained_model
from pipeline.core.io import write_json_atomic

from .embed import embed_gallery, encode_queries, load_model, loader_workers, model_fingerprint, model_stat
from .gallery import PREPARED_SPLITS, describe, gallery_fingerprint, gallery_stat, open_gallery
from .index import build_hnsw, exact_top_k, hnsw_top_k, index_folder, recall_at, resolve_kind, write_index

log = logging.getLogger("pipeline.search")
RECALL_K = 10
# an HNSW index's recall@10 is checked against exact search on a random sample of this many queries
# (the split's captions, or a folder's own images), drawn with RECALL_SEED
RECALL_QUERIES = 1000
RECALL_SEED = 0


def _split_captions(prepared: Path, split: str) -> list[str]:
    from pipeline.evaluation import load_retrieval_split

    return load_retrieval_split(prepared, split).captions


@dataclass(frozen=True)
class IndexPaths:
    """What `index@<variant>` reads and writes: the stage takes them from its dvc.yaml command line."""

    model: Path  # models/<variant>: its best/ checkpoint embeds the gallery
    prepared: Path  # data/prepared: the test or val split as a gallery
    index: Path  # index/<variant>
    metrics: Path  # metrics/index_<variant>.json
    timing: Path  # reports/index/<variant>/timing.json: how long it took, beside the metrics (not in them)

    @classmethod
    def under(cls, root: Path, variant: str) -> "IndexPaths":
        """The project's layout below `root` (what dvc.yaml gives the stage, and the search CLI reads)."""
        return cls(root / "models" / variant, root / "data" / "prepared", index_folder(variant, root / "index"),
                   root / "metrics" / f"index_{variant}.json", root / "reports" / "index" / variant / "timing.json")


def build_index(params: Params, variant: str, device, paths: IndexPaths) -> dict:
    """Embed `search.gallery` with the variant's best checkpoint, write the index folder, return the metrics.

    The metrics come with the timing, written to `paths.metrics` and `paths.timing`. Before anything
    is written, it raises SearchError / GalleryError on bad input and NoTrainedModel without a
    trained model."""
    prepared, spec = paths.prepared, params.search.gallery
    folder = trained_model(paths.model)
    model = load_model(folder, device)
    gallery = open_gallery(spec, prepared)
    # the files' stats before their contents are read: a file that changes from here on is refused
    stats = {"model": model_stat(folder), "gallery": gallery_stat(spec, prepared)}
    workers = loader_workers(len(gallery), params.train.eval_batch_size)
    log.info("index@%s: embedding %d images of %s with %s (%d decoding workers)", variant, len(gallery),
             gallery.source, folder, workers)
    started = time.perf_counter()
    embeddings, gallery = embed_gallery(model, gallery, params.train.eval_batch_size, device, workers)
    embed_seconds = time.perf_counter() - started
    kind = resolve_kind(params.search.index, len(gallery))
    hnsw, recall, index_seconds = None, None, 0.0
    if kind == "hnsw":
        started = time.perf_counter()
        hnsw = build_hnsw(embeddings)
        index_seconds = time.perf_counter() - started
        recall = _recall(model, hnsw, embeddings, prepared, spec, device)
    meta = {
        "kind": kind,
        "size": len(gallery),
        "dim": int(embeddings.shape[1]),
        # content digests (read here, once) and the stats a search checks (docs/search.md)
        "model": {"folder": str(folder), "digest": model_fingerprint(folder), "stat": stats["model"]},
        "gallery": {"name": describe(spec, "data/prepared"), "digest": gallery_fingerprint(spec, prepared),
                    "stat": stats["gallery"]},
    }
    write_index(paths.index, embeddings, gallery, meta, hnsw)
    seconds = embed_seconds + index_seconds
    metrics = {
        "gallery": meta["gallery"]["name"],
        "gallery_size": len(gallery),
        "skipped_images": len(gallery.skipped),
        "skipped": gallery.skipped[:50],  # named (the first 50)
        "index_kind": kind,
        "dim": meta["dim"],
        "recall_at_10": None if recall is None else round(recall[0], 4),
        "recall_queries": None if recall is None else recall[1],
    }
    timing = {"build_seconds": round(seconds, 2), "embed_images_per_second": round(len(gallery) / embed_seconds, 1)}
    write_json_atomic(paths.metrics, metrics)
    write_json_atomic(paths.timing, timing)  # beside the metrics, not in them (core/runtime.py split_timing)
    log.info("index@%s: %s, %s", variant, metrics, timing)
    return {**metrics, **timing}


def _recall(model, hnsw, embeddings: np.ndarray, prepared: Path, spec: str, device) -> tuple[float, int]:
    """(recall@10 of the HNSW index against exact search, queries asked): on a seeded random sample of
    at most RECALL_QUERIES of the split's own captions (a folder has none: of its images' own
    embeddings then)."""
    rng = np.random.default_rng(RECALL_SEED)
    if spec in PREPARED_SPLITS:
        captions = _split_captions(prepared, spec)
        chosen = np.sort(rng.choice(len(captions), min(RECALL_QUERIES, len(captions)), replace=False))
        queries = encode_queries(model, [captions[i] for i in chosen], device).embeddings
    else:
        queries = embeddings[np.sort(rng.choice(len(embeddings), min(RECALL_QUERIES, len(embeddings)), replace=False))]
    k = min(RECALL_K, len(embeddings))
    return recall_at(hnsw_top_k(hnsw, queries, k)[1], exact_top_k(embeddings, queries, k)[1]), len(queries)
