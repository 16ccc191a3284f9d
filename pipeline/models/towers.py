"""Image and text towers: a transformers encoder read out as one feature vector per input.

A tower wraps an unmodified transformers model, so pretrained checkpoints load as they
are, and exposes its encoder `layers` so that feature mixup can hook layer k.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import (
    AutoConfig,
    BertModel,
    CLIPConfig,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
    PreTrainedModel,
    ViTModel,
)

from ..core.hub import pretrained_kwargs
from .mixup import FeatureMix, feature_mixing


def load_pretrained(model_class: type[PreTrainedModel], path: str, **kwargs) -> PreTrainedModel:
    """`model_class.from_pretrained` with float32 master weights and the hub access of the params.

    transformers 5 keeps a checkpoint's stored dtype by default: a float16 checkpoint would give
    float16 parameters, which AdamW cannot move by 1e-5 steps and the fp16 grad scaler refuses.
    """
    return model_class.from_pretrained(path, dtype=torch.float32, **pretrained_kwargs(path), **kwargs)


class Tower(nn.Module):
    model_class: ClassVar[type[PreTrainedModel]]
    model_kwargs: ClassVar[dict] = {}
    # True when the read-out is already a pretrained projection into a joint space (CLIP).
    projected: ClassVar[bool] = False

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    @classmethod
    def from_config(cls, config: dict, **options) -> Tower:
        """A randomly initialised tower from a config dict (e.g. the one `config_dict` saved)."""
        model_config = cls.model_class.config_class.from_dict(config)
        return cls(cls.model_class(model_config, **cls.model_kwargs), **options)

    @classmethod
    def from_pretrained(cls, path: str, **options) -> Tower:
        return cls(load_pretrained(cls.model_class, path, **cls.model_kwargs), **options)

    def config_dict(self) -> dict:
        return self.model.config.to_dict()

    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError


def _grid_size(image_size: int | list | tuple) -> tuple[int, int]:
    return tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)


class ViTTower(Tower):
    """ViT read out at the CLS token (after the final layer norm), as in ViT classification."""

    model_class = ViTModel
    model_kwargs = {"add_pooling_layer": False}  # the tanh pooler would be an unused parameter

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size

    def forward(self, pixel_values: torch.Tensor, mix: FeatureMix | None = None) -> torch.Tensor:
        # Position embeddings are interpolated (bicubic, per forward) only for inputs whose
        # size differs from the checkpoint's grid, e.g. a 224x224 ViT fed 384x128 pedestrians.
        interpolate = tuple(pixel_values.shape[-2:]) != _grid_size(self.model.config.image_size)
        with feature_mixing(self.layers, mix, mix_attention_masks=False):
            output = self.model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate)
        return output.last_hidden_state[:, 0]


class CLIPVisionTower(Tower):
    """CLIP's image tower with its own visual projection."""

    model_class = CLIPVisionModelWithProjection
    projected = True

    @classmethod
    def from_pretrained(cls, path: str, **options) -> Tower:
        return cls(load_pretrained(cls.model_class, path, config=_clip_tower_config(path, "vision")), **options)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.vision_model.encoder.layers

    @property
    def feature_dim(self) -> int:
        return self.model.config.projection_dim

    def forward(self, pixel_values: torch.Tensor, mix: FeatureMix | None = None) -> torch.Tensor:
        # transformers interpolates CLIP's square position grid to any (H/patch, W/patch).
        interpolate = tuple(pixel_values.shape[-2:]) != _grid_size(self.model.config.image_size)
        with feature_mixing(self.layers, mix, mix_attention_masks=False):
            output = self.model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate)
        return output.image_embeds


class BertTower(Tower):
    """BERT read out at [CLS] (`pooling="cls"`) or as the mean over real tokens (`"mean"`)."""

    model_class = BertModel
    model_kwargs = {"add_pooling_layer": False}

    def __init__(self, model: PreTrainedModel, pooling: str = "cls"):
        super().__init__(model)
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.pooling = pooling

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mix: FeatureMix | None = None
    ) -> torch.Tensor:
        with feature_mixing(self.layers, mix, mix_attention_masks=True):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.float() if mix is None else mix.mix_pooling_weights(attention_mask)
        weights = weights.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class CLIPTextTower(Tower):
    """CLIP's text tower, read out at the end-of-text token, with its own text projection.

    Under mixup the read-out blends the anchor's and the partner's end-of-text positions
    with the same lam, so lam = 0 reads the partner exactly where CLIP itself would.
    """

    model_class = CLIPTextModelWithProjection
    projected = True

    @classmethod
    def from_pretrained(cls, path: str, **options) -> Tower:
        return cls(load_pretrained(cls.model_class, path, config=_clip_tower_config(path, "text")), **options)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.text_model.encoder.layers

    @property
    def feature_dim(self) -> int:
        return self.model.config.projection_dim

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mix: FeatureMix | None = None
    ) -> torch.Tensor:
        with feature_mixing(self.layers, mix, mix_attention_masks=True):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows, ends = torch.arange(hidden.shape[0], device=hidden.device), self._end_positions(input_ids)
        features = hidden[rows, ends]
        if mix is not None:
            features = mix.blend(features, hidden[rows, ends[mix.permutation]])
        return self.model.text_projection(features)

    def _end_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where CLIPTextTransformer pools: the end-of-text token."""
        eos_token_id = self.model.config.eos_token_id
        if eos_token_id == 2:  # legacy OpenAI configs: end-of-text is the largest id in the vocabulary
            return input_ids.argmax(dim=-1)
        return (input_ids == eos_token_id).int().argmax(dim=-1)


def _clip_tower_config(path: str, tower: str):
    """One tower's config from a full CLIP checkpoint folder, or a tower-only one as is.

    A full CLIPConfig keeps `projection_dim` at its top level; the tower configs carry their
    own (default 512), which would mis-size the projection of a non-512 checkpoint.
    """
    config = AutoConfig.from_pretrained(path, **pretrained_kwargs(path))
    if not isinstance(config, CLIPConfig):
        return config
    tower_config = config.vision_config if tower == "vision" else config.text_config
    tower_config.projection_dim = config.projection_dim
    return tower_config
