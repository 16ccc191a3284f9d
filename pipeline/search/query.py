"""Answering text queries: a `Searcher` (model + index, checked against each other) and its results."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.core.config import Params
from pipeline.models import trained_model

from .embed import embed_gallery, encode_queries, load_model, model_fingerprint, model_stat
from .gallery import describe, folder_gallery, gallery_fingerprint, gallery_stat
from .index import Index, check_fingerprint, check_k, in_memory_index, index_folder, load_index

log = logging.getLogger("pipeline.search")


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    key: str
    path: str  # the image file, or shard:member
    person_id: int | None


@dataclass(frozen=True)
class Answer:
    query: str
    hits: list[Hit]
    truncated_tokens: int  # the query's token count when longer than the model reads, else 0
    seconds: float

    def to_json(self) -> dict:
        return {"query": self.query, "truncated_tokens": self.truncated_tokens,
                "seconds": round(self.seconds, 4), "results": [asdict(h) for h in self.hits]}


class Searcher:
    """A variant's model and the index it built (or an on-the-fly exact index of a folder)."""

    def __init__(self, model, index: Index, variant: str, device: torch.device):
        self.model, self.index, self.variant, self.device = model, index, variant, device

    @classmethod
    def for_variant(cls, params: Params, variant: str, root: Path = Path("."), device=None) -> "Searcher":
        """index/<variant> with models/<variant>/best.

        It is refused unless that model and the gallery that search.gallery names are the ones that
        built it. The check uses the files' stats that the build recorded (size, modification time).
        So starting reads no shard and hashes no weights. Content is checked only where a stat differs."""
        device = device or torch.device("cpu")
        params.variant(variant)
        folder = trained_model(root / "models" / variant)
        index = load_index(index_folder(variant, root / "index"), variant)
        spec = params.search.gallery
        prepared = root / "data" / "prepared"
        check_fingerprint(index, variant, model_stat(folder), describe(spec, "data/prepared"), gallery_stat(spec, prepared),
                          lambda: model_fingerprint(folder), lambda: gallery_fingerprint(spec, prepared))
        if index.gallery.files and not Path(index.gallery.files[0]).is_absolute() and root != Path("."):
            index.gallery.files = [str(root / f) for f in index.gallery.files]
        return cls(load_model(folder, device), index, variant, device)

    @classmethod
    def for_folder(cls, params: Params, variant: str, gallery_dir: str, root: Path = Path("."),
                   device=None) -> "Searcher":
        """Exact search over a folder embedded now (no index written, nothing to check)."""
        device = device or torch.device("cpu")
        params.variant(variant)
        model = load_model(folder := trained_model(root / "models" / variant), device)
        gallery = folder_gallery(gallery_dir)
        embeddings, gallery = embed_gallery(model, gallery, params.train.eval_batch_size, device)
        if gallery.skipped:
            log.warning("%s: %d unreadable files skipped", gallery_dir, len(gallery.skipped))
        meta = {"size": len(gallery), "model": {"folder": str(folder)}, "gallery": {"name": gallery.source}}
        return cls(model, in_memory_index(embeddings, gallery, meta), variant, device)

    def search(self, queries: list[str], k: int) -> list[Answer]:
        """One answer per query, the top-k best first; the queries are encoded as one batch."""
        check_k(k, len(self.index))
        started = time.perf_counter()
        encoded = encode_queries(self.model, queries, self.device)
        scores, rows = self.index.top_k(encoded.embeddings, k)
        seconds = (time.perf_counter() - started) / max(1, len(queries))
        gallery = self.index.gallery
        answers = []
        for query, row_scores, row_ids, truncated in zip(queries, scores, rows, encoded.truncated):
            if truncated:
                log.warning("query %r is %d tokens, the model reads %d: truncated", _short(query), truncated,
                            self.model.config.max_text_length)
            hits = [Hit(rank, float(score), gallery.keys[g], gallery.location(g), gallery.person_id(g))
                    for rank, (score, g) in enumerate(zip(row_scores.tolist(), row_ids.tolist()), 1) if g >= 0]
            answers.append(Answer(query, hits, truncated, seconds))
        return answers

    def image_bytes(self, key: str) -> bytes:
        return self.index.gallery.image_bytes(self.row_of(key))

    def row_of(self, key: str) -> int:
        if not hasattr(self, "_rows"):
            self._rows = {k: i for i, k in enumerate(self.index.gallery.keys)}
        return self._rows[key]


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(answer: Answer, index: Index) -> str:
    """The ranked table the CLI prints."""
    lines = [f"query: {answer.query}", f"index: {index.folder} ({index.kind}, {len(index)} images)",
             f"{'rank':>4}  {'score':>7}  {'person':>6}  image"]
    for hit in answer.hits:
        person = "-" if hit.person_id is None else str(hit.person_id)
        lines.append(f"{hit.rank:>4}  {hit.score:>7.4f}  {person:>6}  {hit.path}")
    return "\n".join(lines)


def plot_answer(searcher: Searcher, answer: Answer, path: str | Path) -> None:
    """The query with its top-k (house style: pipeline.plots.plot_retrievals; frames are neutral,
    since a free-text query has no ground truth)."""
    from pipeline.plots import plot_retrievals

    images = [searcher.image_bytes(hit.key) for hit in answer.hits]
    plot_retrievals([answer.query], [images], [[None] * len(images)], path,
                    f"{searcher.variant}: top-{len(images)} of {len(searcher.index)} ({searcher.index.kind})")

