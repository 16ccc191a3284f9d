"""The embedded generator's architecture: Stable Diffusion's parts, assembled as a pipeline.

The parts are AutoencoderKL, UNet2DConditionModel and a text encoder. Their sizes come from
params.yaml's `generator` section."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline.core.config import GeneratorConfig
from pipeline.models import minilm_path
from pipeline.generator.caption_tokenizer import train_caption_tokenizer

log = logging.getLogger(__name__)


SCHEDULE = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}

MIN_GROUP_WIDTH = 4  # channels per GroupNorm group, as in Stable Diffusion's autoencoder (128 / 32)

def build_vae(cfg: GeneratorConfig) -> AutoencoderKL:
    levels = len(cfg.vae_channels)
    return AutoencoderKL(
        block_out_channels=cfg.vae_channels, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, latent_channels=cfg.latent_channels,
        norm_num_groups=_groups(cfg.vae_channels), sample_size=max(cfg.height, cfg.width),
        mid_block_add_attention=False,  # attention over the whole image costs much and buys little here
    )


def build_unet(cfg: GeneratorConfig, text_dim: int | None = None) -> UNet2DConditionModel:
    """Cross-attention only at the lowest resolution.

    A step with cross-attention at 16x8 too cost +81%. In the down path only it cost +23% and did not
    help (docs/generator.md). The prompt enters through cross-attention only, not the time embedding.
    Through the time embedding it painted the whole person one colour (docs/generator.md)."""
    levels = len(cfg.unet_channels)
    scale = latent_downsampling(cfg)
    return UNet2DConditionModel(
        sample_size=(cfg.height // scale, cfg.width // scale), in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, block_out_channels=cfg.unet_channels, layers_per_block=1,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        cross_attention_dim=text_dim or cfg.text_width, attention_head_dim=8,
        norm_num_groups=_groups(cfg.unet_channels),
    )


def build_text_side(cfg: GeneratorConfig, captions: Iterable[str]) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, bool]:
    """(tokenizer, text encoder, whether it trains): the frozen pretrained MiniLM, or a small CLIP text
    model with a tokenizer learned on the captions."""
    if cfg.text_encoder == "minilm":
        tokenizer = AutoTokenizer.from_pretrained(minilm_path(), model_max_length=cfg.prompt_tokens)
        return tokenizer, truncated_minilm(cfg.minilm_layers), False
    tokenizer = train_caption_tokenizer(captions)
    return tokenizer, build_text_encoder(cfg, tokenizer), True


def truncated_minilm(layers: int) -> BertModel:
    """The pretrained MiniLM keeping only its first `layers` Transformer layers, so that its output
    is that layer's hidden states and the saved pipeline computes them with a plain `BertModel`.
    The last layer is not used, because there a garment noun's state does not say which colour it
    has. A linear read-out of the trousers' colour from "trousers" falls from 100% at layers 1-5 to
    83% at layer 6 (benchmarks/bench_minilm_binding.py). A UNet conditioned on it painted the
    trousers in the top's colour (docs/generator.md)."""
    available = AutoConfig.from_pretrained(minilm_path()).num_hidden_layers
    if not 1 <= layers <= available:
        raise ValueError(f"generator.minilm_layers must be in [1, {available}] (MiniLM has {available} layers), got {layers}")
    return BertModel.from_pretrained(minilm_path(), num_hidden_layers=layers).eval()


def build_text_encoder(cfg: GeneratorConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
            num_hidden_layers=cfg.text_layers, num_attention_heads=max(1, cfg.text_width // 32),
            max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )


def latent_downsampling(cfg: GeneratorConfig) -> int:
    """Pixels per latent cell along each side: the autoencoder halves the size at every level but the last."""
    return 2 ** (len(cfg.vae_channels) - 1)


def _groups(channels: tuple[int, ...]) -> int:
    """The largest GroupNorm group count (at most 32) that divides every level's width and leaves
    each group at least MIN_GROUP_WIDTH channels. A group of one channel is instance norm: it
    removes each channel's image-wide mean, and with it the absolute garment hue."""
    fits = [g for g in range(1, 33) if all(c % g == 0 and c // g >= MIN_GROUP_WIDTH for c in channels)]
    return max(fits, default=1)

def assemble_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    for module in (vae, text_encoder, unet):
        module.eval().requires_grad_(False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SCHEDULE),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
