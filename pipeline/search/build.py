"""Building a variant's index (the `index@<variant>` stage): embed the gallery, index it, measure it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from pipeline.config import Params
from pipeline.io import write_json_atomic

from .embed import embed_gallery, encode_queries, load_model, model_fingerprint, model_folder
from .gallery import PREPARED_SPLITS, describe, gallery_fingerprint, open_gallery
from .index import build_hnsw, exact_top_k, hnsw_top_k, index_folder, recall_at, resolve_kind, write_index

log = logging.getLogger("pipeline.search")
RECALL_K = 10


def _split_captions(prepared: Path, split: str) -> list[str]:
    from pipeline.evaluation import load_retrieval_split

    return load_retrieval_split(prepared, split).captions


def build_index(params: Params, variant: str, device, root: Path = Path(".")) -> dict:
    """Embed `search.gallery` with models/<variant>/best, write index/<variant> and return the metrics
    (written to metrics/index_<variant>.json). Raises SearchError / GalleryError on bad input before
    anything is written."""
    prepared, spec = root / "data" / "prepared", params.search.gallery
    folder = model_folder(variant, root / "models")
    model = load_model(folder, variant, device)
    gallery, images = open_gallery(spec, prepared)
    log.info("index@%s: embedding %d images of %s with %s", variant, len(gallery), gallery.source, folder)
    started = time.perf_counter()
    embeddings, gallery = embed_gallery(model, gallery, images, params.train.eval_batch_size, device)
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
        "model": {"folder": str(folder.relative_to(root) if folder.is_relative_to(root) else folder),
                  "digest": model_fingerprint(folder)},
        "gallery": {"name": describe(spec, "data/prepared"), "digest": gallery_fingerprint(spec, prepared)},
    }
    write_index(index_folder(variant, root / "index"), embeddings, gallery, meta, hnsw)
    seconds = embed_seconds + index_seconds
    metrics = {
        "gallery": meta["gallery"]["name"],
        "gallery_size": len(gallery),
        "skipped_images": len(gallery.skipped),
        "skipped": gallery.skipped[:50],  # named (the first 50)
        "index_kind": kind,
        "dim": meta["dim"],
        "build_seconds": round(seconds, 2),
        "embed_images_per_second": round(len(gallery) / embed_seconds, 1),
        "recall_at_10": None if recall is None else round(recall, 4),
    }
    write_json_atomic(root / "metrics" / f"index_{variant}.json", metrics)
    log.info("index@%s: %s", variant, metrics)
    return metrics


def _recall(model, hnsw, embeddings: np.ndarray, prepared: Path, spec: str, device) -> float | None:
    """recall@10 of the HNSW index against exact search, on the split's own captions (a folder has
    none: its images' own embeddings are the queries then)."""
    if spec in PREPARED_SPLITS:
        queries = encode_queries(model, _split_captions(prepared, spec), device).embeddings
    else:
        queries = embeddings[np.linspace(0, len(embeddings) - 1, min(1000, len(embeddings))).astype(int)]
    k = min(RECALL_K, len(embeddings))
    return recall_at(hnsw_top_k(hnsw, queries, k)[1], exact_top_k(embeddings, queries, k)[1])
