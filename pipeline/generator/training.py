"""Trains the embedded generator: a small latent diffusion model in Stable Diffusion's layout.

Training runs in two phases on the CPU.
1. The `AutoencoderKL` learns reconstruction from the posterior mean, plus a small KL term.
2. The `UNet2DConditionModel` trains on the frozen autoencoder's posterior means. It uses epsilon
   prediction, with captions dropped to "" at `caption_dropout` for classifier-free guidance.
   `generator.text_encoder` picks its conditioning. That is the frozen pretrained MiniLM, whose
   prompt states are computed once, or a small `CLIPTextModel` trained jointly.

The result is saved as a `StableDiffusionPipeline` folder, so it loads with the same
`from_pretrained` call as a real Stable Diffusion checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import (
    CLIPTokenizer,
    PreTrainedModel,
)

from pipeline.core.config import GeneratorConfig
from pipeline.generator.build import SCHEDULE, assemble_pipeline, build_text_side, build_unet, build_vae, latent_downsampling
from pipeline.generator.data import LabelledImages
from pipeline.optimization import warmup_cosine_schedule

log = logging.getLogger(__name__)


KL_WEIGHT = 1e-4  # per latent element: keeps the latents bounded without blurring the reconstructions
WARMUP_FRACTION = 0.05
GRAD_CLIP = 1.0

@dataclass
class TrainedGenerator:
    sd: StableDiffusionPipeline
    vae_losses: list[tuple[int, float]] = field(default_factory=list)
    unet_losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

def train_vae(
    vae: AutoencoderKL, pixels: torch.Tensor, cfg: GeneratorConfig, *, show_progress: bool = True
) -> list[tuple[int, float]]:
    """L1 reconstruction from the posterior mean plus a small KL. Returns (step, loss) per step.
    The autoencoder is convolutional (no attention), so it can train on random crops
    (`vae_crop_fraction`). A half-size crop costs a quarter of a whole image. Measured with the
    loading and optimiser overheads, that gives 3x the steps in the same time.

    It decodes the mean, not a sample. Sampled latents start with unit noise. After 600 sampled
    steps the decoder had learned only washed-out hues (purple came back gray, green dark, 21.5 dB)."""
    rng = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    schedule = warmup_cosine_schedule(optimizer, cfg.vae_steps, WARMUP_FRACTION)
    vae.train()
    losses = []
    progress = tqdm(range(cfg.vae_steps), desc="vae", disable=not show_progress)
    for step in progress:
        batch = _flip_some(pixels[_batch_indices(len(pixels), cfg.vae_batch_size, rng)], rng)
        batch = _random_crop(batch, cfg.vae_crop_fraction, latent_downsampling(cfg), rng)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.mode()).sample
        kl_per_element = posterior.kl().mean() / posterior.mean[0].numel()
        loss = F.l1_loss(reconstruction, batch) + KL_WEIGHT * kl_per_element
        _optimise(loss, optimizer, schedule, vae.parameters())
        losses.append((step, loss.item()))
        progress.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    return losses


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = 128) -> float:
    """Mean PSNR (dB, on [0, 1] pixels) of the autoencoder's reconstructions from the posterior mode."""
    scores = []
    for batch in pixels.split(batch_size):
        reconstruction = vae.decode(vae.encode(batch).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((reconstruction - batch) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        scores.append(-10 * torch.log10(mse))
    return torch.cat(scores).mean().item()


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Posterior means of every image and, after them, of its mirror image (index + len(pixels))."""
    both = torch.cat([pixels, pixels.flip(-1)])
    return torch.cat([vae.encode(batch).latent_dist.mode() for batch in both.split(batch_size)])


def set_latent_scale(vae: AutoencoderKL, latent_means: torch.Tensor) -> float:
    """Stable Diffusion's `scaling_factor`: scales the latents to unit variance for the diffusion model."""
    scale = 1.0 / latent_means.std().item()
    vae.register_to_config(scaling_factor=scale)
    return scale


def tokenize_captions(tokenizer: CLIPTokenizer, captions: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded token ids (images, captions per image, length), padding the short lists by repetition,
    and the ids of the empty prompt; padded like the pipeline pads prompts at sampling time."""
    per_image = max(len(c) for c in captions)
    flat = [c[i % len(c)] for c in captions for i in range(per_image)]
    ids = _token_ids(tokenizer, flat).view(len(captions), per_image, -1)
    return ids, _token_ids(tokenizer, [""])[0]


def _token_ids(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def prompt_states(text_encoder: PreTrainedModel, ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The frozen encoder's last hidden states for token ids (..., tokens), computed once."""
    flat = ids.reshape(-1, ids.shape[-1])
    states = torch.cat([text_encoder(chunk)[0] for chunk in flat.split(batch_size)])
    return states.view(*ids.shape, -1)


def train_unet(
    unet: UNet2DConditionModel,
    text_encoder: PreTrainedModel,
    latents: torch.Tensor,
    caption_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    scaling_factor: float,
    cfg: GeneratorConfig,
    *,
    train_text_encoder: bool = True,
    show_progress: bool = True,
) -> list[tuple[int, float]]:
    """Epsilon prediction on the posterior means. The text encoder trains jointly, or is frozen.
    When frozen, its prompt states are computed once, and a step costs the UNet alone.

    `latents` holds each image and, after them, its mirror image. `caption_ids` is
    (images, captions per image, tokens).
    """
    rng = torch.Generator().manual_seed(cfg.seed + 1)
    noise_scheduler = DDPMScheduler(**_ddpm_schedule())
    frozen = None if train_text_encoder else (prompt_states(text_encoder, caption_ids), prompt_states(text_encoder, empty_ids[None])[0])
    parameters = [*unet.parameters(), *(text_encoder.parameters() if train_text_encoder else ())]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.unet_lr, weight_decay=0.01)
    schedule = warmup_cosine_schedule(optimizer, cfg.unet_steps, WARMUP_FRACTION)
    images, per_image = caption_ids.shape[:2]
    unet.train(), text_encoder.train(train_text_encoder)
    # the moving average is what gets saved: short runs end on a noisy iterate otherwise
    average = EMAModel(parameters, decay=cfg.ema_decay, foreach=True) if cfg.ema_decay else None
    losses = []
    progress = tqdm(range(cfg.unet_steps), desc="unet", disable=not show_progress)
    for step in progress:
        index = _batch_indices(len(latents), cfg.unet_batch_size, rng)
        clean = latents[index] * scaling_factor
        choice = torch.randint(per_image, (len(index),), generator=rng)
        dropped = torch.rand(len(index), generator=rng) < cfg.caption_dropout
        if frozen is None:
            ids = torch.where(dropped[:, None], empty_ids[None], caption_ids[index % images, choice])
            states = text_encoder(ids)[0]
        else:
            states = torch.where(dropped[:, None, None], frozen[1][None], frozen[0][index % images, choice])
        noise = torch.randn(clean.shape, generator=rng)
        timesteps = sample_timesteps(len(index), noise_scheduler.config.num_train_timesteps,
                                     cfg.high_noise_fraction, rng)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=states).sample
        loss = F.mse_loss(prediction, noise)
        _optimise(loss, optimizer, schedule, parameters)
        if average is not None:
            average.step(parameters)
        losses.append((step, loss.item()))
        progress.set_postfix(loss=f"{loss.item():.4f}")
    if average is not None:
        average.copy_to(parameters)
    unet.eval(), text_encoder.eval()
    return losses


def sample_timesteps(count: int, total: int, high_noise_fraction: float, rng: torch.Generator) -> torch.Tensor:
    """Training timesteps, a `high_noise_fraction` share of them from the noisier half of the schedule
    (0.5 = uniform): the garment colours are decided at high noise, where the prompt matters most."""
    timesteps = torch.randint(total // 2, (count,), generator=rng)
    noisier = torch.rand(count, generator=rng) < high_noise_fraction
    return torch.where(noisier, timesteps + total // 2, timesteps)


def _ddpm_schedule() -> dict:
    return {k: v for k, v in SCHEDULE.items() if k != "set_alpha_to_one"}


def _batch_indices(count: int, batch_size: int, rng: torch.Generator) -> torch.Tensor:
    return torch.randint(count, (batch_size,), generator=rng)


def _random_crop(batch: torch.Tensor, fraction: float, multiple: int, rng: torch.Generator) -> torch.Tensor:
    """One random window of `fraction` of the height and width (a multiple of the latent
    downsampling), the same for the whole batch."""
    if fraction >= 1:
        return batch
    height, width = batch.shape[-2:]
    crop_h, crop_w = (max(multiple, round(fraction * size / multiple) * multiple) for size in (height, width))
    top = int(torch.randint(height - crop_h + 1, (1,), generator=rng))
    left = int(torch.randint(width - crop_w + 1, (1,), generator=rng))
    return batch[..., top : top + crop_h, left : left + crop_w]


def _flip_some(batch: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(batch), generator=rng) < 0.5
    return torch.where(flip[:, None, None, None], batch.flip(-1), batch)


def _optimise(loss: torch.Tensor, optimizer, schedule, parameters) -> None:
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"non-finite generator loss {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, GRAD_CLIP)
    optimizer.step()
    schedule.step()

def train_generator(
    cfg: GeneratorConfig, train: LabelledImages, *, vae: AutoencoderKL | None = None, show_progress: bool = True
) -> TrainedGenerator:
    """Both phases on `train` (already at cfg.height x cfg.width); returns the assembled pipeline.
    Given a trained `vae`, only the UNet trains (for experiments on the UNet and its conditioning)."""
    torch.manual_seed(cfg.seed)
    seconds = {}
    started = time.perf_counter()
    vae_losses = []
    if vae is None:
        vae = build_vae(cfg)
        vae_losses = train_vae(vae, train.pixels, cfg, show_progress=show_progress)
    seconds["vae"] = time.perf_counter() - started

    started = time.perf_counter()
    tokenizer, text_encoder, train_text = build_text_side(cfg, (c for captions in train.captions for c in captions))
    caption_ids, empty_ids = tokenize_captions(tokenizer, train.captions)
    latents = encode_latents(vae, train.pixels)
    scaling_factor = set_latent_scale(vae, latents)
    unet = build_unet(cfg, text_encoder.config.hidden_size)
    log.info("vae %.2fM, unet %.2fM, text encoder %.2fM parameters, vocabulary %d, latent scale %.3f",
             _millions(vae), _millions(unet), _millions(text_encoder), len(tokenizer), scaling_factor)
    unet_losses = train_unet(unet, text_encoder, latents, caption_ids, empty_ids, scaling_factor, cfg,
                             train_text_encoder=train_text, show_progress=show_progress)
    seconds["unet"] = time.perf_counter() - started
    sd = assemble_pipeline(vae, text_encoder, tokenizer, unet)
    return TrainedGenerator(sd, vae_losses, unet_losses, seconds)


def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6
