"""Scorers of the filter's consistency check: the project's own dual encoder, or a CLIP checkpoint.

A scorer embeds images and texts into one L2-normalised space. `load_scorer` picks one from
`filter.scorer`. That is a trained dual encoder folder such as models/baseline, else a CLIP folder or
hub id. CLIP sees person crops padded to a square, because its processor would cut a tall crop to
its waist band.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.core.hub import access, looks_like_path, pretrained_kwargs
from pipeline.pdg.crops import padded, processor_fill
from pipeline.core.devices import inference_dtype


class Scorer(Protocol):
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


class DualEncoderScorer:
    """The project's own dual encoder (L2-normalised embeddings), each call one batch."""

    def __init__(self, model, device: torch.device | str = "cpu"):
        self.model, self.device = model.eval().to(device), torch.device(device)

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.model.embed_images(images, batch_size=max(1, len(images))).cpu()

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.embed_texts(texts, batch_size=max(1, len(texts))).cpu()


class ClipScorer:
    """A CLIP checkpoint (folder or hub id) with its tokenizer and image processor. Every crop is
    padded to a square first (`pipeline.pdg.crops`). The processor's centre crop would otherwise
    keep only the middle of a tall person crop, and edits of shoes, hair or legs would go unseen."""

    def __init__(self, path: str, device: torch.device | str = "cpu"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        path = check_clip_checkpoint(path)
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(path, dtype=inference_dtype(self.device), **pretrained_kwargs(path))
        self.model = self.model.eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, **pretrained_kwargs(path))
        self.processor = AutoImageProcessor.from_pretrained(path, **pretrained_kwargs(path))
        self.fill = processor_fill(self.processor)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The processor's input for the crops, each padded to a square on the processor's mean colour."""
        return self.processor(images=padded(images, self.fill), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.pixel_values(images).to(self.device, self.model.dtype)
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        features = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                attention_mask=tokens["attention_mask"].to(self.device))
        return F.normalize(_features(features).float(), dim=-1).cpu()


class NoSuchCheckpoint(FileNotFoundError):
    """A scorer named as a folder that does not exist (or a hub id that is not available)."""


def check_clip_checkpoint(path: str) -> str:
    """The name to load `path` by (a folder with ~ expanded, or the hub id); NoSuchCheckpoint when
    there is nothing by that name, ValueError when there is something but not a CLIP checkpoint."""
    from transformers import AutoConfig

    folder = Path(path).expanduser()
    if folder.is_dir():
        path = str(folder)
    elif looks_like_path(path):
        raise NoSuchCheckpoint(f"no such folder {folder}")
    try:
        config = AutoConfig.from_pretrained(path, **pretrained_kwargs(path))
    except (OSError, ValueError) as err:
        if folder.is_dir():
            raise ValueError(f"the folder {folder} is not a CLIP checkpoint (no readable config.json): {err}") from None
        network = "" if access().allow_network else " (hub.allow_network is false: only the local cache is read)"
        raise NoSuchCheckpoint(f"no such folder, and no hub model by that name{network}: {err}") from None
    if config.model_type != "clip":
        raise ValueError(f"{path} holds a {config.model_type!r} model, not a CLIP checkpoint")
    return path


def _features(output) -> torch.Tensor:
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def dual_encoder_folder(path: str | Path) -> Path | None:
    """The saved dual encoder `filter.scorer` names: a saved model itself, or a variant's model folder
    (the project's `models/<variant>`, or any folder holding a `best/`), whose trained model it is
    (none yet: NoTrainedModel, one line naming the stage to run). None for anything else: a CLIP
    folder, wherever it lies (`/models/clip-vit-base-patch16` too), or a hub id."""
    from pipeline.models.dual_encoder import CONFIG_NAME, trained_model

    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "best").is_dir() or (not path.is_absolute() and path.parts[:1] == ("models",)):
        return trained_model(path)
    return None


def load_scorer(scorer: str, device: torch.device | str = "cpu") -> Scorer:
    """A project dual encoder (see `dual_encoder_folder`) or else a CLIP folder or hub id."""
    saved = dual_encoder_folder(scorer)
    if saved is None:
        return ClipScorer(scorer, device)
    from pipeline.models import DualEncoder

    return DualEncoderScorer(DualEncoder.from_pretrained(saved, device=device), device)
