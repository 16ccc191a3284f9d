"""Embedding for search: the trained model and its digest, gallery images in batches, text queries."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.core.io import file_digest
from pipeline.models import DualEncoder
from pipeline.models.dual_encoder import CONFIG_NAME, WEIGHTS_NAME

from .gallery import Gallery, GalleryError, decode, file_stat, read_span, subset

log = logging.getLogger("pipeline.search")

# what makes up a saved model: weights, architecture and the tokenizer's files
_MODEL_FILES = (WEIGHTS_NAME, CONFIG_NAME, "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                "vocab.txt", "special_tokens_map.json")


class SearchError(ValueError):
    """Bad input to a search: the message is the one line the user sees."""


def model_fingerprint(folder: Path) -> str:
    """A digest of the saved model's files (their contents: a retrained model is another model), taken
    when the index is built."""
    present = [name for name in _MODEL_FILES if (folder / name).is_file()]
    return hashlib.sha256(json.dumps([[name, file_digest(folder / name)] for name in present]).encode()).hexdigest()


def model_stat(folder: Path) -> list[list]:
    """[name, size, mtime_ns] of each of the saved model's files: what a search compares with the
    index's record (a stat each, nothing read)."""
    return [file_stat(folder / name) for name in _MODEL_FILES if (folder / name).is_file()]


def load_model(folder: Path, device: torch.device) -> DualEncoder:
    """The model of `folder` (a variant's: `pipeline.models.trained_model`) in eval mode on `device`."""
    return DualEncoder.from_pretrained(folder, device=device).to(device).eval()


# decoding processes beside the one that runs the model (embed_gallery): at most this many
LOADER_WORKERS_MAX = 8


def loader_workers(images: int, batch_size: int) -> int:
    """One decoding worker per core the model's process leaves free (at least one, at most
    LOADER_WORKERS_MAX); none for a gallery of one batch, where there is nothing to overlap."""
    if images <= batch_size:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(LOADER_WORKERS_MAX, cores - 1))


class GalleryImages(Dataset):
    """Row -> (row, preprocessed pixels, or None where the file or member is not a readable image).

    Where each image lies is held in NumPy arrays and one bytes string, not per-row Python objects, so
    forked workers share it instead of copying it page by page as they touch reference counts."""

    def __init__(self, gallery: Gallery, preprocess):
        if gallery.spans is None and any(gallery.members):
            raise ValueError(f"{gallery.source}: shard images need their offsets (open_gallery scans them)")
        files = list(dict.fromkeys(gallery.files))  # distinct, in order: a few shards, or every file of a folder
        number = {name: i for i, name in enumerate(files)}
        self.file_ids = np.fromiter((number[f] for f in gallery.files), dtype=np.int64, count=len(gallery))
        encoded = [name.encode() for name in files]
        self.path_ends = np.cumsum([0] + [len(e) for e in encoded])
        self.paths = b"".join(encoded)
        self.spans = np.array(gallery.spans if gallery.spans is not None else np.full((len(gallery), 2), -1),
                              dtype=np.int64).reshape(len(gallery), 2)  # offset -1: the whole file
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.file_ids)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor | None]:
        file = self.file_ids[row]
        path = self.paths[self.path_ends[file] : self.path_ends[file + 1]].decode()
        offset, size = self.spans[row].tolist()
        try:
            payload = Path(path).read_bytes() if offset < 0 else read_span(path, offset, size)
            return row, self.preprocess(decode(payload))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            return row, None


def _collate(items: list) -> tuple[list[int], torch.Tensor | None, list[int]]:
    """A loader batch: the readable rows, their pixels stacked, the unreadable rows."""
    rows = [row for row, pixels in items if pixels is not None]
    pixels = torch.stack([pixels for _, pixels in items if pixels is not None]) if rows else None
    return rows, pixels, [row for row, pixels in items if pixels is None]


@torch.no_grad()
def embed_gallery(model: DualEncoder, gallery: Gallery, batch_size: int, device: torch.device,
                  workers: int | None = None) -> tuple[np.ndarray, Gallery]:
    """Unit image embeddings [N, D] float32 in gallery order.

    They are batched as `evaluate` batches them, so the rows equal its gallery embeddings. Unreadable
    folder files are skipped, and the returned gallery lists them under `skipped`. Images are
    streamed. A DataLoader's worker processes (`loader_workers`) read and decode them from the shards
    or files, two batches each ahead of the model. So about (2 x workers + 2) batches of pixels are
    held at once, never the gallery's bytes."""
    workers = loader_workers(len(gallery), batch_size) if workers is None else workers
    loader = DataLoader(GalleryImages(gallery, model.image_preprocessor), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate, prefetch_factor=2 if workers else None)
    out: np.ndarray | None = None
    kept: list[int] = []
    pending: list[torch.Tensor] = []
    pending_rows: list[int] = []

    def encode(pixels: torch.Tensor, rows: list[int]) -> None:
        nonlocal out
        vectors = model.embed_images(pixels, batch_size).cpu().numpy()
        if out is None:
            out = np.empty((len(gallery), vectors.shape[1]), dtype=np.float32)
        out[len(kept) : len(kept) + len(rows)] = vectors
        kept.extend(rows)

    with tqdm(total=len(gallery), desc="embedding gallery", unit="img", mininterval=2.0, leave=False) as progress:
        for rows, pixels, unreadable in loader:
            progress.update(len(rows) + len(unreadable))
            for row in unreadable:
                if gallery.members[row]:
                    raise GalleryError(f"{gallery.location(row)}: not a readable image")
                log.warning("%s: not a readable image, skipped", gallery.location(row))
            if rows:
                pending.append(pixels)
                pending_rows.extend(rows)
            while len(pending_rows) >= batch_size:  # evaluate's batches: batch_size readable images each
                stacked = pending[0] if len(pending) == 1 else torch.cat(pending)
                encode(stacked[:batch_size], pending_rows[:batch_size])
                pending = [stacked[batch_size:]] if len(stacked) > batch_size else []
                pending_rows = pending_rows[batch_size:]
    if pending_rows:
        encode(torch.cat(pending), pending_rows)
    if not kept:
        raise SearchError(f"{gallery.source}: none of its {len(gallery)} files is a readable image")
    if len(kept) == len(gallery):
        return out, gallery
    return out[: len(kept)].copy(), subset(gallery, kept)


def text_length_limit(model: DualEncoder) -> int:
    return model.config.max_text_length


@dataclass(frozen=True)
class EncodedQueries:
    embeddings: np.ndarray  # [Q, D] unit vectors
    truncated: list[int]  # token count of each query longer than the model reads (0 = not truncated)


def check_queries(queries: list[str]) -> None:
    """SearchError, one line, for an empty or blank query."""
    for number, query in enumerate(queries, 1):
        if not query.strip():
            where = f"query {number}" if len(queries) > 1 else "the query"
            raise SearchError(f"{where} is empty: give a description such as \"a woman in a red coat\"")


def encode_queries(model: DualEncoder, queries: list[str], device: torch.device, batch_size: int = 64) -> EncodedQueries:
    """Text embeddings of `queries`; an empty or blank query is a SearchError (`check_queries`)."""
    check_queries(queries)
    limit = text_length_limit(model)
    lengths = [len(ids) for ids in model.tokenizer(list(queries), truncation=False)["input_ids"]]
    embeddings = model.embed_texts(queries, batch_size).cpu().numpy()
    return EncodedQueries(embeddings, [n if n > limit else 0 for n in lengths])
