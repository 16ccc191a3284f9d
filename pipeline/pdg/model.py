"""The text-to-image latent diffusion model that PDG edits with, in Stable Diffusion's layout.

`load_generator` reads any `StableDiffusionPipeline` folder (the project's small trained model or a
real Stable Diffusion checkpoint) into `DiffusionParts`; `build_tiny_generator` writes a tiny random
one for tests. `fit_to_model` / `back_to_crop` move person crops to and from the model's resolution
(its sample size, or the `canvas` it was loaded with).

Precision: the UNet and the text encoder run in the loaded dtype (float16 / bfloat16 on a GPU), the
VAE always in float32 (Stable Diffusion's VAE overflows to NaN in float16 for some inputs), and every
latent and embedding outside a UNet call is float32: `predict_noise` casts in and out, so scheduler
steps, blending and the null-text optimisation keep float32 arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMInverseScheduler,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from pipeline.hub import pretrained_kwargs

Box = tuple[int, int, int, int]  # left, top, right, bottom

# Words the tiny tokenizer knows whole; "|" splits a word into several tokens, so that colour swaps
# with unequal token counts ("red" -> "turquoise") occur in tests as they do with CLIP's real vocabulary.
TINY_WORDS = (
    "a", "the", "man", "woman", "in", "with", "and", "wearing", "jacket", "shirt", "pants", "jeans",
    "shoes", "backpack", "red", "green", "blue", "black", "white", "gray", "yellow", "pink",
    "purple", "brown", "orange", "turqu|oise", "mag|enta",
)


@dataclass
class DiffusionParts:
    """The components of a latent diffusion model, on one device, in inference mode."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    canvas: tuple[int, int] | None = None  # (width, height) pixels to work at; None = the UNet's sample size

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's (and text encoder's) dtype; latents and embeddings outside it stay float32."""
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the images the model generates: the canvas if set, else its sample size."""
        if self.canvas is not None:
            return self.canvas
        height, width = _pair(self.unet.config.sample_size)
        return width * self.vae_scale_factor, height * self.vae_scale_factor

    def inverse_scheduler(self) -> DDIMInverseScheduler:
        return DDIMInverseScheduler.from_config(self.scheduler.config)

    def predict_noise(self, latents: torch.Tensor, timestep, text_embeddings: torch.Tensor) -> torch.Tensor:
        """One UNet call: inputs cast to its dtype, the noise prediction handed back in float32."""
        noise = self.unet(latents.to(self.dtype), timestep, encoder_hidden_states=text_embeddings.to(self.dtype))
        return noise.sample.float()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (batch, tokens, dim) in float32; the padding matches `alignment.tokenize`."""
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.device))[0].float()

    @torch.no_grad()
    def images_to_latents(self, images: list[Image.Image]) -> torch.Tensor:
        """float32 latents of images already at the model's size; the posterior mean, so inversion is deterministic."""
        pixels = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor).preprocess(images)
        posterior = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return posterior.mode().float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def latents_to_images(self, latents: torch.Tensor) -> list[Image.Image]:
        pixels = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor).postprocess(pixels, output_type="pil")


PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_precision(precision: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """`pdg.precision` as a dtype: auto is float16 on CUDA, float32 elsewhere."""
    if isinstance(precision, torch.dtype):
        return precision
    if precision == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return PRECISIONS[precision]


def load_generator(
    path_or_hub_id: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    canvas: tuple[int, int] | None = None,
) -> DiffusionParts:
    """Loads a `StableDiffusionPipeline` folder or hub id (no safety checker) with a DDIM scheduler.

    `dtype` (a dtype or a `pdg.precision` name) applies to the UNet and the text encoder; the VAE
    stays float32, since Stable Diffusion's VAE decodes some latents to NaN in float16 (and it runs
    twice per image, so its cost is small). Weights load in float32 and are cast, so a float32
    checkpoint's VAE is not rounded through half on the way. `canvas` is the (width, height) pixel
    canvas to fit crops into (multiples of the VAE's scale factor); None = the UNet's sample size.
    """
    dtype = resolve_precision(dtype, device)
    pipeline = StableDiffusionPipeline.from_pretrained(
        str(path_or_hub_id), safety_checker=None, requires_safety_checker=False, dtype=torch.float32,
        **pretrained_kwargs(path_or_hub_id),
    )
    pipeline.to(device)
    for module in (pipeline.vae, pipeline.unet, pipeline.text_encoder):
        module.eval().requires_grad_(False)
    if dtype != torch.float32:
        pipeline.unet.to(dtype)
        pipeline.text_encoder.to(dtype)
    parts = DiffusionParts(
        vae=pipeline.vae,
        unet=pipeline.unet,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        # inversion and sampling must walk the same deterministic timesteps, whatever the model trained with
        scheduler=DDIMScheduler.from_config(pipeline.scheduler.config),
        canvas=None if canvas is None else (int(canvas[0]), int(canvas[1])),
    )
    if parts.canvas is not None and any(side % parts.vae_scale_factor for side in parts.canvas):
        raise ValueError(f"canvas {parts.canvas} is not a multiple of the VAE's scale factor {parts.vae_scale_factor}")
    return parts


def build_tiny_generator(
    directory: str | Path, *, latent_size: tuple[int, int] = (16, 8), max_tokens: int = 16, seed: int = 0
) -> Path:
    """Saves a tiny random Stable-Diffusion-layout model and returns its folder.

    `latent_size` is (height, width); the VAE downsamples by 2, so images are twice that.
    """
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(TINY_WORDS, max_tokens)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=max_tokens, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        mid_block_add_attention=False,
    )
    unet = UNet2DConditionModel(
        sample_size=latent_size, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
    return Path(directory)


def tiny_tokenizer(words: tuple[str, ...], max_tokens: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with every byte plus the given words ('|' marks token boundaries inside a word)."""
    byte_symbols = list(bytes_to_unicode().values())
    vocab = {symbol: index for index, symbol in enumerate(byte_symbols + [s + "</w>" for s in byte_symbols])}
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = word.split("|")
        for index, piece in enumerate(pieces):
            symbols = list(piece)
            if index == len(pieces) - 1:
                symbols[-1] += "</w>"
            _add_merges(_apply_merges(symbols, ranks), vocab, ranks)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=max_tokens)


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE: merge the best-ranked adjacent pair until none is known."""
    symbols = list(symbols)
    while len(symbols) > 1:
        rank, position = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == len(ranks):
            break
        symbols[position : position + 2] = [symbols[position] + symbols[position + 1]]
    return symbols


def _add_merges(segments: list[str], vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> None:
    """Merges that join a word's current segments left to right. Ranked after every existing merge,
    they fire only once BPE has reached these segments, so earlier words keep their tokens."""
    merged = segments[0]
    for segment in segments[1:]:
        ranks.setdefault((merged, segment), len(ranks))
        merged += segment
        vocab.setdefault(merged, len(vocab))


def fit_to_model(
    image: Image.Image, size: tuple[int, int], fill: tuple[int, int, int] = (127, 127, 127)
) -> tuple[Image.Image, Box]:
    """Resizes `image` to fit (width, height) keeping its aspect ratio, pads it centred; returns the content box."""
    width, height = size
    scale = min(width / image.width, height / image.height)
    content_width = max(1, round(image.width * scale))
    content_height = max(1, round(image.height * scale))
    left, top = (width - content_width) // 2, (height - content_height) // 2
    canvas = Image.new("RGB", size, fill)
    canvas.paste(image.convert("RGB").resize((content_width, content_height), Image.Resampling.BICUBIC), (left, top))
    return canvas, (left, top, left + content_width, top + content_height)


def back_to_crop(image: Image.Image, box: Box, original_size: tuple[int, int]) -> Image.Image:
    """Undoes `fit_to_model`: cuts the content box out and resizes it to the original (width, height)."""
    return image.crop(box).resize(original_size, Image.Resampling.BICUBIC)


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
