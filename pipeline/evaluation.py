"""Text-to-image retrieval evaluation of a dual encoder on a prepared split.

Queries are every caption of the split, and the gallery is every image (docs/design.md, section 3,
"Evaluation protocol"). Colour-edit sensitivity measures how often an image prefers its true caption
over the same caption with one colour changed by the caption editor. That is what proximity pairs
teach. Under several processes each embeds an interleaved share and the shares are gathered,
so the result is the same as one process computing everything.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from pipeline.data.canonical import image_member, iter_shard_samples, list_shards
from pipeline.metrics import retrieval_metrics
from pipeline.text.caption_edit import edit_captions
from pipeline.text.lexicon import LOWER_GARMENTS, UPPER_GARMENTS


@dataclass(frozen=True)
class RetrievalSplit:
    image_keys: list[str]
    image_bytes: list[bytes]
    image_pids: torch.Tensor
    captions: list[str]
    caption_pids: torch.Tensor
    caption_image_index: list[int]  # which gallery image each caption describes


def load_retrieval_split(prepared_dir: str | Path, split: str) -> RetrievalSplit:
    keys, images, image_pids, captions, caption_pids, owners = [], [], [], [], [], []
    shards = list_shards(prepared_dir, split)
    if not shards:
        raise FileNotFoundError(f"no {split} shards under {Path(prepared_dir) / 'shards'}")
    for sample in iter_shard_samples(shards):
        row = json.loads(sample["json"])
        keys.append(sample["__key__"])
        images.append(image_member(sample, f"{split} shards"))
        image_pids.append(row["person_id"])
        for caption in row["captions"]:
            captions.append(caption)
            caption_pids.append(row["person_id"])
            owners.append(len(keys) - 1)
    return RetrievalSplit(
        keys, images, torch.tensor(image_pids), captions, torch.tensor(caption_pids), owners
    )


def _sharded_embed(count: int, embed: Callable[[list[int]], torch.Tensor], accelerator=None) -> torch.Tensor:
    """Embed items 0..count-1; with N processes rank r takes items r, r+N, ... and all are gathered.

    `embed` maps a rank's item numbers to their embeddings on the device. The shares stay there
    until they are gathered (NCCL gathers device tensors only). The result is on the CPU.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    per_rank = -(-count // world)
    mine = [min(rank + world * i, count - 1) for i in range(per_rank)]  # padded with the last item
    local = embed(mine)
    if world == 1:
        return local.cpu()
    gathered = accelerator.gather(local.contiguous())  # [world * per_rank, D], rank-major
    order = torch.arange(per_rank * world).view(world, per_rank).t().reshape(-1)
    return gathered.cpu()[order][:count]


def embed_retrieval_split(
    model, data: RetrievalSplit, batch_size: int, device: torch.device, accelerator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption embeddings [Q, D], image embeddings [G, D]) in float32 on the CPU.

    The model embeds on its own device, which is `device`.
    """

    def images(indices: list[int]) -> torch.Tensor:
        return model.embed_images((Image.open(io.BytesIO(data.image_bytes[i])) for i in indices), batch_size)

    def texts(indices: list[int]) -> torch.Tensor:
        return model.embed_texts([data.captions[i] for i in indices], batch_size)

    text_emb = _sharded_embed(len(data.captions), texts, accelerator)
    image_emb = _sharded_embed(len(data.image_keys), images, accelerator)
    return text_emb, image_emb


def garment_kind(phrase: str) -> str:
    """upper, lower or other, by the phrase's last word ("dark blue jeans" -> lower)."""
    noun = phrase.lower().replace("-", "").split()[-1]
    return "upper" if noun in UPPER_GARMENTS else "lower" if noun in LOWER_GARMENTS else "other"


def _preference(margin: torch.Tensor) -> dict[str, float]:
    return {"edits": len(margin), "prefers_true_pct": round(100.0 * (margin > 0).float().mean().item(), 2),
            "mean_margin": round(margin.mean().item(), 4)}


@torch.no_grad()
def colour_sensitivity(
    model, data: RetrievalSplit, text_emb: torch.Tensor, image_emb: torch.Tensor, batch_size: int,
    device: torch.device, seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Colour-edit sensitivity per garment kind (and `all`).

    That is the share (%) of editable captions whose own image scores higher with the true caption
    than with one seeded colour edit of it, and the mean margin s(image, true) - s(image, edited).
    Captions without an editable colour are left out, and counted."""
    edits = edit_captions(data.captions, 1, seed)
    editable = [i for i, found in enumerate(edits) if found]
    result = {"editable_captions": len(editable), "captions": len(data.captions)}
    if not editable:
        return result
    edited = model.embed_texts([edits[i][0].edited for i in editable], batch_size).cpu()
    own_images = image_emb[torch.tensor([data.caption_image_index[i] for i in editable])]
    margin = (text_emb[editable] * own_images).sum(1) - (edited * own_images).sum(1)
    kinds = [garment_kind(edits[i][0].changes[0].phrase_before) for i in editable]
    result["all"] = _preference(margin)
    for kind in ("upper", "lower", "other"):
        mask = torch.tensor([k == kind for k in kinds])
        if mask.any():
            result[kind] = _preference(margin[mask])
    return result


def evaluate_retrieval(
    model, data: RetrievalSplit, batch_size: int, device: torch.device, accelerator=None
) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics (percentages) and the [Q, G] similarity matrix."""
    return retrieval_scores(data, *embed_retrieval_split(model, data, batch_size, device, accelerator))


def retrieval_scores(data: RetrievalSplit, text_emb: torch.Tensor, image_emb: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    similarity = text_emb @ image_emb.t()
    return retrieval_metrics(similarity, data.caption_pids, data.image_pids), similarity
