"""Embedding for search: the trained model and its digest, gallery images in batches, text queries."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.io import file_digest
from pipeline.models import DualEncoder, tokenize
from pipeline.models.dual_encoder import CONFIG_NAME, WEIGHTS_NAME

from .gallery import Gallery, iter_images, subset

log = logging.getLogger("pipeline.search")

# what makes up a saved model: weights, architecture and the tokenizer's files
_MODEL_FILES = (WEIGHTS_NAME, CONFIG_NAME, "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                "vocab.txt", "special_tokens_map.json")


class SearchError(ValueError):
    """Bad input to a search: the message is the one line the user sees."""


def model_folder(variant: str, models: str | Path = "models") -> Path:
    return Path(models) / variant / "best"


def model_fingerprint(folder: Path) -> str:
    """A digest of the saved model's files (their contents: a retrained model is another model)."""
    present = [name for name in _MODEL_FILES if (folder / name).is_file()]
    return hashlib.sha256(json.dumps([[name, file_digest(folder / name)] for name in present]).encode()).hexdigest()


def load_model(folder: Path, variant: str, device: torch.device) -> DualEncoder:
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise SearchError(f"no trained model in {folder}: run `dvc repro train@{variant}` first")
    return DualEncoder.from_pretrained(folder, device=device).to(device).eval()


@torch.no_grad()
def embed_gallery(model: DualEncoder, gallery: Gallery, images: list, batch_size: int,
                  device: torch.device) -> tuple[np.ndarray, Gallery]:
    """Unit image embeddings [N, D] float32 in gallery order, batched as `evaluate` batches them (so
    the rows equal its gallery embeddings); unreadable folder files are skipped, and the returned
    gallery lists them under `skipped`."""
    chunks, kept, batch, rows = [], [], [], []

    def flush():
        if batch:
            pixels = torch.stack(batch).to(device)
            chunks.append(model.encode_image(pixels).float().cpu())
            kept.extend(rows)
            batch.clear(), rows.clear()

    progress = tqdm(iter_images(gallery, images), total=len(gallery), desc="embedding gallery", unit="img",
                    mininterval=2.0, leave=False)
    for index, image in progress:
        if image is None:
            log.warning("%s: not a readable image, skipped", gallery.location(index))
            continue
        batch.append(model.image_preprocessor(image))
        rows.append(index)
        if len(batch) == batch_size:
            flush()
    flush()
    if not kept:
        raise SearchError(f"{gallery.source}: none of its {len(gallery)} files is a readable image")
    result = gallery if len(kept) == len(gallery) else subset(gallery, kept)
    return torch.cat(chunks).numpy(), result


def text_length_limit(model: DualEncoder) -> int:
    return model.config.max_text_length


@dataclass(frozen=True)
class EncodedQueries:
    embeddings: np.ndarray  # [Q, D] unit vectors
    truncated: list[int]  # token count of each query longer than the model reads (0 = not truncated)


@torch.no_grad()
def encode_queries(model: DualEncoder, queries: list[str], device: torch.device, batch_size: int = 64) -> EncodedQueries:
    """Text embeddings of `queries`; an empty or blank query is a SearchError."""
    for number, query in enumerate(queries, 1):
        if not query.strip():
            where = f"query {number}" if len(queries) > 1 else "the query"
            raise SearchError(f"{where} is empty: give a description such as \"a woman in a red coat\"")
    limit = text_length_limit(model)
    lengths = [len(ids) for ids in model.tokenizer(list(queries), truncation=False)["input_ids"]]
    chunks = []
    for start in range(0, len(queries), batch_size):
        tokens = tokenize(model.tokenizer, queries[start : start + batch_size], limit)
        chunks.append(model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float().cpu())
    return EncodedQueries(torch.cat(chunks).numpy(), [n if n > limit else 0 for n in lengths])
