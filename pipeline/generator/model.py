"""The text-to-image latent diffusion model that PDG edits with, in Stable Diffusion's layout.

`load_generator` reads any `StableDiffusionPipeline` folder into `DiffusionParts`. The folder may hold
the project's small trained model or a real Stable Diffusion checkpoint. Tests build tiny ones
(tests/tiny_generator.py). `fit_to_model` / `back_to_crop` move person crops to and from the model's
resolution. That resolution is its sample size, or the `canvas` it was loaded with.

Precision follows three rules.
- The UNet and the text encoder run in the loaded dtype (float16 / bfloat16 on a GPU).
- The VAE always runs in float32, because Stable Diffusion's VAE overflows to NaN in float16 for
  some inputs.
- Every latent and embedding outside a UNet call is float32. `predict_noise` casts in and out, so
  scheduler steps, blending and the null-text optimisation keep float32 arithmetic.
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
from transformers import CLIPTextModel, CLIPTokenizer

from pipeline.core.hub import pretrained_kwargs
from pipeline.core.devices import generator_dtype

Box = tuple[int, int, int, int]  # left, top, right, bottom



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
        """Text embeddings (batch, tokens, dim) in float32; the padding matches `alignment.tokenize_prompt`."""
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


def load_generator(
    path_or_hub_id: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    canvas: tuple[int, int] | None = None,
) -> DiffusionParts:
    """Loads a `StableDiffusionPipeline` folder or hub id (no safety checker) with a DDIM scheduler.

    `dtype` is a dtype or a `pdg.precision` name. It applies to the UNet and the text encoder. The VAE
    stays float32, since Stable Diffusion's VAE decodes some latents to NaN in float16. The VAE runs
    twice per image, so its cost is small. Weights load in float32 and are cast, so a float32
    checkpoint's VAE is not rounded through half on the way. `canvas` is the (width, height) pixel
    canvas to fit crops into, in multiples of the VAE's scale factor. None means the UNet's sample size.
    """
    dtype = generator_dtype(dtype, device)
    sd = StableDiffusionPipeline.from_pretrained(
        str(path_or_hub_id), safety_checker=None, requires_safety_checker=False, dtype=torch.float32,
        **pretrained_kwargs(path_or_hub_id),
    )
    sd.to(device)
    for module in (sd.vae, sd.unet, sd.text_encoder):
        module.eval().requires_grad_(False)
    if dtype != torch.float32:
        sd.unet.to(dtype)
        sd.text_encoder.to(dtype)
    parts = DiffusionParts(
        vae=sd.vae,
        unet=sd.unet,
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        # inversion and sampling must walk the same deterministic timesteps, whatever the model trained with
        scheduler=DDIMScheduler.from_config(sd.scheduler.config),
        canvas=None if canvas is None else (int(canvas[0]), int(canvas[1])),
    )
    if parts.canvas is not None and any(side % parts.vae_scale_factor for side in parts.canvas):
        raise ValueError(f"canvas {parts.canvas} is not a multiple of the VAE's scale factor {parts.vae_scale_factor}")
    return parts


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
