"""The index over a gallery's embeddings: exact (one matrix product) or FAISS HNSW (approximate).

An index folder holds `embeddings.npy` (unit vectors, gallery order), `gallery.parquet` (the table),
`hnsw.faiss` for an approximate index, and `index.json`: kind, size, dimension and the fingerprint of
the model and gallery that built it (content digests, and the files' sizes and modification times).
Search with another model or a changed gallery is refused, by those file stats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.io import write_json_atomic, writing_directory

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
# exact search scores queries in blocks: at most this many bytes of scores at a time
SCORE_BLOCK_BYTES = 1 << 28


def index_folder(variant: str, root: str | Path = "index") -> Path:
    return Path(root) / variant


def resolve_kind(requested: str, size: int) -> str:
    if requested == "auto":
        return "exact" if size <= AUTO_EXACT_LIMIT else "hnsw"
    return requested


def exact_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], rows [Q, k]) by cosine, best first.

    Ties go to the lower row, as in evaluate's stable sort. The product is NumPy's (BLAS, every core).
    The selection is torch.topk, on every core. With it, exact search was about 4x faster than FAISS's
    exact search at 10^5 on 2 cores (benchmarks/bench_search.py). Queries go in blocks whose score
    matrix stays under SCORE_BLOCK_BYTES, and one buffer is reused for every block."""
    n, count = embeddings.shape[0], queries.shape[0]
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    block = max(1, min(count, SCORE_BLOCK_BYTES // (4 * max(1, n))))
    buffer = np.empty((block, n), dtype=np.float32)
    top, rows = np.empty((count, min(k, n)), dtype=np.float32), np.empty((count, min(k, n)), dtype=np.int64)
    for start in range(0, count, block):
        part = queries[start : start + block]
        scores = np.matmul(part, embeddings.T, out=buffer[: len(part)])
        top[start : start + len(part)], rows[start : start + len(part)] = _select(scores, k)
    return top, rows


def _select(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row of `scores` [Q, N], ordered by (score descending, row ascending)."""
    n = scores.shape[1]
    if k >= n:
        rows = np.lexsort((np.broadcast_to(np.arange(n), scores.shape), -scores), axis=-1)
        return np.take_along_axis(scores, rows, 1), rows
    # k + 1: the one after the k-th says whether the k-th score continues past the cut
    values, found = (t.numpy() for t in torch.topk(torch.from_numpy(scores), k + 1, dim=1, sorted=True))
    top, rows = values[:, :k], found[:, :k]
    order = np.lexsort((rows, -top), axis=-1)
    top, rows = np.take_along_axis(top, order, 1), np.take_along_axis(rows, order, 1)
    # where the (k+1)-th ties the k-th, torch.topk may have kept any of the tied items: keep the lowest rows
    for q in np.flatnonzero(values[:, k] == values[:, k - 1]):
        kth = values[q, k - 1]
        above = rows[q][top[q] > kth]
        rows[q] = np.concatenate([above, np.flatnonzero(scores[q] == kth)[: k - len(above)]])
        top[q] = scores[q, rows[q]]
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


def check_k(k: int, size: int | None = None) -> None:
    """SearchError, one line, for a k below 1 or above the gallery's `size` (when known)."""
    if k < 1:
        raise SearchError(f"k is {k}: it must be at least 1")
    if size is not None and k > size:
        raise SearchError(f"k is {k}, but the gallery has {size} images: give -k {size} or less")


def in_memory_index(embeddings: np.ndarray, gallery: Gallery, meta: dict) -> Index:
    """An exact index that was never written (`search --gallery DIR`)."""
    return Index(Path(gallery.source), {"kind": "exact", **meta}, embeddings, gallery)


def write_index(folder: Path, embeddings: np.ndarray, gallery: Gallery, meta: dict, hnsw=None) -> None:
    """Write the whole folder under a staging name, then swap it in (pipeline/core/io.py: an existing index is
    replaced only once the new one is complete)."""
    with writing_directory(folder) as tmp:
        np.save(tmp / EMBEDDINGS_FILE, embeddings.astype(np.float32))
        write_table(gallery, tmp / TABLE_NAME)
        if hnsw is not None:
            import faiss

            faiss.write_index(hnsw, str(tmp / HNSW_FILE))
        write_json_atomic(tmp / INDEX_FILE, meta)


def load_index(folder: Path, variant: str) -> Index:
    """The index folder, its vectors held once.

    An exact index maps `embeddings.npy` read-only. It is paged in by the first search and shared
    through the page cache. An HNSW index's `embeddings` is a view of the vectors the FAISS graph
    holds, and embeddings.npy is not read."""
    meta_file = Path(folder) / INDEX_FILE
    if not meta_file.is_file():
        raise SearchError(f"no index in {folder}: build it with `dvc repro index@{variant}`")

    def unreadable(reason: str) -> SearchError:
        return SearchError(f"{folder}: the index is unreadable ({reason}): rebuild it with `dvc repro -f index@{variant}`")

    try:
        meta = json.loads(meta_file.read_text())
        gallery = read_table(Path(folder) / TABLE_NAME)
        hnsw = None
        if meta.get("kind") == "hnsw":
            import faiss

            hnsw = faiss.read_index(str(Path(folder) / HNSW_FILE))
            embeddings = hnsw_vectors(hnsw)
        else:
            embeddings = np.load(Path(folder) / EMBEDDINGS_FILE, mmap_mode="r")
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise unreadable(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    if embeddings.shape[0] != len(gallery):
        raise unreadable(f"{embeddings.shape[0]} vectors for {len(gallery)} images")
    return Index(Path(folder), meta, embeddings, gallery, hnsw)


def hnsw_vectors(hnsw) -> np.ndarray:
    """The [N, D] float32 vectors an IndexHNSWFlat stores, as a NumPy view (no copy: valid while `hnsw` lives)."""
    import faiss

    storage = faiss.downcast_index(hnsw.storage)
    return faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * storage.d).reshape(storage.ntotal, storage.d)


def check_fingerprint(index: Index, variant: str, model_stat: list, gallery_name: str, gallery_stat,
                      model_digest=None, gallery_digest=None) -> None:
    """Refuse an index that another model or another gallery built, saying how to rebuild it.

    The check is by file stats (size, modification time) that the build recorded beside the content
    digests. So nothing is read while they agree. A stat may differ because a `dvc checkout` or a copy
    rewrites files with the same bytes. Then `model_digest()` / `gallery_digest()`, when given,
    decide by content. The cost is paid only then."""
    rebuild = f"rebuild it with `dvc repro index@{variant}`"
    built = index.meta

    def same(part: str, stat, digest) -> bool:
        if built[part].get("stat") == stat:
            return True
        return digest is not None and built[part].get("digest") == digest()

    if not same("model", model_stat, model_digest):
        raise SearchError(f"{index.folder} was built by another model than {built['model']['folder']} now holds: {rebuild}")
    if built["gallery"]["name"] != gallery_name:
        raise SearchError(f"{index.folder} indexes the gallery {built['gallery']['name']}, but search.gallery is "
                          f"{gallery_name}: {rebuild}")
    if not same("gallery", gallery_stat, gallery_digest):
        raise SearchError(f"{index.folder}: the gallery {gallery_name} changed since the index was built: {rebuild}")
