"""The index over a gallery's embeddings: exact (one matrix product) or FAISS HNSW (approximate).

An index folder holds `embeddings.npy` (unit vectors, gallery order), `gallery.parquet` (the table),
`hnsw.faiss` for an approximate index, and `index.json`: kind, size, dimension and the fingerprint of
the model and gallery that built it. Search with another model or a changed gallery is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.io import write_json_atomic, writing_directory

from .embed import SearchError
from .gallery import TABLE_NAME, Gallery, read_table, write_table

INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.npy"
HNSW_FILE = "hnsw.faiss"
# auto: exact search up to this many images (a few ms a query there, benchmarks/results/search.json),
# HNSW above it
AUTO_EXACT_LIMIT = 200_000
# HNSW graph degree and search breadth, chosen by benchmarks/bench_search.py (docs/search.md): at
# efSearch 128 recall@10 is 0.99 at 10^5 but 0.94 at 10^6, so 256; efConstruction 40 is FAISS's default
HNSW_M = 32
HNSW_EF_SEARCH = 256
HNSW_EF_CONSTRUCTION = 40


def index_folder(variant: str, root: str | Path = "index") -> Path:
    return Path(root) / variant


def resolve_kind(requested: str, size: int) -> str:
    if requested == "auto":
        return "exact" if size <= AUTO_EXACT_LIMIT else "hnsw"
    return requested


def exact_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], rows [Q, k]) by cosine, best first; ties go to the lower row, as in evaluate's
    stable sort. Queries go in blocks so that the score matrix stays under 256 MB."""
    block = max(1, (1 << 26) // max(1, embeddings.shape[0]))
    if queries.shape[0] > block:
        parts = [exact_top_k(embeddings, queries[i : i + block], k) for i in range(0, queries.shape[0], block)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    scores = queries @ embeddings.T  # [Q, N]
    n = scores.shape[1]
    if k >= n:
        rows = np.lexsort((np.broadcast_to(np.arange(n), scores.shape), -scores), axis=-1)
        return np.take_along_axis(scores, rows, 1), rows
    part = np.argpartition(scores, n - k, axis=1)[:, n - k :]  # the k largest, unordered
    part_scores = np.take_along_axis(scores, part, 1)
    order = np.lexsort((part, -part_scores), axis=-1)
    rows, top = np.take_along_axis(part, order, 1), np.take_along_axis(part_scores, order, 1)
    # an item tied with the k-th may have been left outside the partition while a higher row is in:
    # where a row has more items at its k-th score than the partition kept, redo it in full
    kth = top[:, -1:]
    for q in np.flatnonzero((scores == kth).sum(1) > (top == kth).sum(1)):
        full = np.lexsort((np.arange(n), -scores[q]))[:k]
        rows[q], top[q] = full, scores[q, full]
    return top, rows


def build_hnsw(embeddings: np.ndarray):
    import faiss

    index = faiss.IndexHNSWFlat(embeddings.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    index.hnsw.efSearch = HNSW_EF_SEARCH
    return index


def hnsw_top_k(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, rows


def recall_at(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k rows that the approximate top-k also holds."""
    hits = [len(set(a.tolist()) & set(e.tolist())) / e.size for a, e in zip(approximate, exact)]
    return float(np.mean(hits)) if hits else 0.0


@dataclass
class Index:
    folder: Path
    meta: dict
    embeddings: np.ndarray
    gallery: Gallery
    hnsw: object | None = None

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def __len__(self) -> int:
        return len(self.gallery)

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        check_k(k, len(self))
        if self.hnsw is not None:
            return hnsw_top_k(self.hnsw, queries, k)
        return exact_top_k(self.embeddings, queries, k)

    def describe(self) -> dict:
        return {"folder": str(self.folder), "kind": self.kind, "size": len(self), "dim": int(self.embeddings.shape[1]),
                "gallery": self.meta["gallery"], "model": self.meta["model"]}


def check_k(k: int, size: int) -> None:
    if k < 1:
        raise SearchError(f"k is {k}: it must be at least 1")
    if k > size:
        raise SearchError(f"k is {k}, but the gallery has {size} images: give -k {size} or less")


def in_memory_index(embeddings: np.ndarray, gallery: Gallery, meta: dict) -> Index:
    """An exact index that was never written (`search --gallery DIR`)."""
    return Index(Path(gallery.source), {"kind": "exact", **meta}, embeddings, gallery)


def write_index(folder: Path, embeddings: np.ndarray, gallery: Gallery, meta: dict, hnsw=None) -> None:
    """Write the whole folder under a staging name, then swap it in (pipeline/io.py: an existing index is
    replaced only once the new one is complete)."""
    with writing_directory(folder) as tmp:
        np.save(tmp / EMBEDDINGS_FILE, embeddings.astype(np.float32))
        write_table(gallery, tmp / TABLE_NAME)
        if hnsw is not None:
            import faiss

            faiss.write_index(hnsw, str(tmp / HNSW_FILE))
        write_json_atomic(tmp / INDEX_FILE, meta)


def load_index(folder: Path, variant: str) -> Index:
    meta_file = Path(folder) / INDEX_FILE
    if not meta_file.is_file():
        raise SearchError(f"no index in {folder}: build it with `dvc repro index@{variant}`")
    try:
        meta = json.loads(meta_file.read_text())
        embeddings = np.load(Path(folder) / EMBEDDINGS_FILE)
        gallery = read_table(Path(folder) / TABLE_NAME)
    except (OSError, ValueError, KeyError) as err:
        raise SearchError(f"{folder}: the index is unreadable ({err}): rebuild it with `dvc repro -f index@{variant}`") from None
    hnsw = None
    if meta.get("kind") == "hnsw":
        import faiss

        hnsw = faiss.read_index(str(Path(folder) / HNSW_FILE))
    return Index(Path(folder), meta, embeddings, gallery, hnsw)


def check_fingerprint(index: Index, variant: str, model_digest: str, gallery_name: str, gallery_digest: str) -> None:
    """Refuse an index that another model or another gallery built, saying how to rebuild it."""
    rebuild = f"rebuild it with `dvc repro index@{variant}`"
    built = index.meta
    if built["model"]["digest"] != model_digest:
        raise SearchError(f"{index.folder} was built by another model than {built['model']['folder']} now holds: {rebuild}")
    if built["gallery"]["name"] != gallery_name:
        raise SearchError(f"{index.folder} indexes the gallery {built['gallery']['name']}, but search.gallery is "
                          f"{gallery_name}: {rebuild}")
    if built["gallery"]["digest"] != gallery_digest:
        raise SearchError(f"{index.folder}: the gallery {gallery_name} changed since the index was built: {rebuild}")
