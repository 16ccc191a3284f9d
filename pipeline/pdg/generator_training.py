"""Trains the embedded generator: a small latent diffusion model in Stable Diffusion's layout.

Two phases on the CPU: first the `AutoencoderKL` (reconstruction from the posterior mean + a small
KL term), then the `UNet2DConditionModel` on the frozen autoencoder's posterior means (epsilon
prediction, captions dropped to "" at `caption_dropout` for classifier-free guidance), conditioned
on the frozen pretrained MiniLM (its prompt states computed once) or on a small `CLIPTextModel`
trained jointly (`generator.text_encoder`).
The result is saved as a `StableDiffusionPipeline` folder, so it loads with the same
`from_pretrained` call as a real Stable Diffusion checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import math
import textwrap
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_cosine_schedule_with_warmup
from PIL import Image
from tqdm.auto import tqdm
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

from pipeline.config import GeneratorConfig
from pipeline.data.canonical import iter_shard_samples, list_shards
from pipeline.models import minilm_path
from pipeline.plots import plt, save_figure

from .caption_tokenizer import train_caption_tokenizer

log = logging.getLogger(__name__)

# Stable Diffusion's noise schedule, so the embedded model and a real checkpoint sample alike.
SCHEDULE = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}
KL_WEIGHT = 1e-4  # per latent element: keeps the latents bounded without blurring the reconstructions
WARMUP_FRACTION = 0.05
GRAD_CLIP = 1.0
MIN_GROUP_WIDTH = 4  # channels per GroupNorm group, as in Stable Diffusion's autoencoder (128 / 32)
POINTER_FILE = "pretrained.json"  # in the generator folder when params name a pretrained checkpoint


@dataclass
class LabelledImages:
    """One split at the generator's resolution: pixels in [-1, 1], captions and attributes per image."""

    pixels: torch.Tensor  # (images, 3, height, width)
    captions: list[list[str]]
    attributes: list[dict[str, str]]

    def __len__(self) -> int:
        return len(self.captions)

    def __add__(self, other: LabelledImages) -> LabelledImages:
        return LabelledImages(torch.cat([self.pixels, other.pixels]), self.captions + other.captions,
                              self.attributes + other.attributes)


@dataclass
class TrainedGenerator:
    pipeline: StableDiffusionPipeline
    vae_losses: list[tuple[int, float]] = field(default_factory=list)
    unet_losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def load_images(prepared_dir: str | Path, split: str, height: int, width: int) -> LabelledImages:
    """Reads a split from its shards (self-contained: the source folder is not needed)."""
    images = labelled_images((_decoded(sample) for sample in iter_shard_samples(list_shards(prepared_dir, split))),
                             height, width)
    if not len(images):
        raise ValueError(f"no {split} images in {prepared_dir}")
    return images


def _decoded(sample: dict) -> tuple[Image.Image, list[str], dict[str, str]]:
    row = json.loads(sample["json"])
    image_bytes = next(sample[ext] for ext in ("png", "jpg", "webp") if ext in sample)
    attributes = json.loads(row["attributes"]) if row.get("attributes") else {}
    return Image.open(io.BytesIO(image_bytes)), list(row["captions"]), attributes


def labelled_images(
    samples: Iterable[tuple[Image.Image, list[str], dict[str, str]]], height: int, width: int
) -> LabelledImages:
    """(image, captions, attributes) triples at the generator's resolution."""
    pixels, captions, attributes = [], [], []
    for image, image_captions, image_attributes in samples:
        image = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        pixels.append(_to_tensor(image))
        captions.append(image_captions)
        attributes.append(image_attributes)
    stacked = torch.stack(pixels) if pixels else torch.empty(0, 3, height, width)
    return LabelledImages(stacked, captions, attributes)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1


def build_vae(cfg: GeneratorConfig) -> AutoencoderKL:
    levels = len(cfg.vae_channels)
    return AutoencoderKL(
        block_out_channels=cfg.vae_channels, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, latent_channels=cfg.latent_channels,
        norm_num_groups=_groups(cfg.vae_channels), sample_size=max(cfg.height, cfg.width),
        mid_block_add_attention=False,  # attention over the whole image costs much and buys little here
    )


def build_unet(cfg: GeneratorConfig, text_dim: int | None = None) -> UNet2DConditionModel:
    """Cross-attention only at the lowest resolution: a step with it at 16x8 too cost +81% (+23% in
    the down path only, which did not help: README). With `global_text`, an attention-pooled prompt
    embedding is added to the time embedding too (diffusers' addition_embed_type "text"): off by
    default, since it lets the model paint the whole person in the dominant colour and carries the
    edited prompt to every block during a Prompt-to-Prompt edit."""
    levels = len(cfg.unet_channels)
    scale = latent_downsampling(cfg)
    return UNet2DConditionModel(
        sample_size=(cfg.height // scale, cfg.width // scale), in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, block_out_channels=cfg.unet_channels, layers_per_block=1,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        cross_attention_dim=text_dim or cfg.text_width, attention_head_dim=8,
        norm_num_groups=_groups(cfg.unet_channels), addition_embed_type="text" if cfg.global_text else None,
        addition_embed_type_num_heads=max(1, (text_dim or cfg.text_width) // 16),
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
    Why not the last layer: there, a garment noun's state no longer says which colour it has
    (a linear read-out of the trousers' colour from "trousers" falls from 100% at layers 1-5 to 83%
    at layer 6: benchmarks/bench_minilm_binding.py), and a UNet conditioned on it painted the
    trousers in the top's colour (README)."""
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


def train_vae(
    vae: AutoencoderKL, pixels: torch.Tensor, cfg: GeneratorConfig, *, show_progress: bool = True
) -> list[tuple[int, float]]:
    """L1 reconstruction from the posterior mean plus a small KL; returns (step, loss) per step.
    The autoencoder is convolutional (no attention), so it can train on random crops
    (`vae_crop_fraction`): a half-size crop costs a quarter of a whole image (measured: 3x the steps
    in the same time, with the loading and optimiser overheads).

    Decoding the mean, not a sample: sampled latents start with unit noise, and after 600 sampled
    steps the decoder had learned only washed-out hues (purple came back gray, green dark; 21.5 dB)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(WARMUP_FRACTION * cfg.vae_steps), cfg.vae_steps)
    vae.train()
    losses = []
    progress = tqdm(range(cfg.vae_steps), desc="vae", disable=not show_progress)
    for step in progress:
        batch = _flip_some(pixels[_batch_indices(len(pixels), cfg.vae_batch_size, generator)], generator)
        batch = _random_crop(batch, cfg.vae_crop_fraction, latent_downsampling(cfg), generator)
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
    """Epsilon prediction on the posterior means; the text encoder trains jointly, or is frozen and
    its prompt states are computed once (then a step costs the UNet alone).

    `latents` holds each image and, after them, its mirror image; `caption_ids` is
    (images, captions per image, tokens).
    """
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    noise_scheduler = DDPMScheduler(**_ddpm_schedule())
    frozen = None if train_text_encoder else (prompt_states(text_encoder, caption_ids), prompt_states(text_encoder, empty_ids[None])[0])
    parameters = [*unet.parameters(), *(text_encoder.parameters() if train_text_encoder else ())]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.unet_lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(WARMUP_FRACTION * cfg.unet_steps), cfg.unet_steps)
    images, per_image = caption_ids.shape[:2]
    unet.train(), text_encoder.train(train_text_encoder)
    average = ParameterAverage(parameters, cfg.ema_decay) if cfg.ema_decay else None
    losses = []
    progress = tqdm(range(cfg.unet_steps), desc="unet", disable=not show_progress)
    for step in progress:
        index = _batch_indices(len(latents), cfg.unet_batch_size, generator)
        clean = latents[index] * scaling_factor
        choice = torch.randint(per_image, (len(index),), generator=generator)
        dropped = torch.rand(len(index), generator=generator) < cfg.caption_dropout
        if frozen is None:
            ids = torch.where(dropped[:, None], empty_ids[None], caption_ids[index % images, choice])
            states = text_encoder(ids)[0]
        else:
            states = torch.where(dropped[:, None, None], frozen[1][None], frozen[0][index % images, choice])
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = sample_timesteps(len(index), noise_scheduler.config.num_train_timesteps,
                                     cfg.high_noise_fraction, generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=states).sample
        loss = F.mse_loss(prediction, noise)
        _optimise(loss, optimizer, schedule, parameters)
        if average is not None:
            average.update(parameters, step)
        losses.append((step, loss.item()))
        progress.set_postfix(loss=f"{loss.item():.4f}")
    if average is not None:
        average.copy_to(parameters)
    unet.eval(), text_encoder.eval()
    return losses


def sample_timesteps(count: int, total: int, high_noise_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Training timesteps, a `high_noise_fraction` share of them from the noisier half of the schedule
    (0.5 = uniform): the garment colours are decided at high noise, where the prompt matters most."""
    timesteps = torch.randint(total // 2, (count,), generator=generator)
    noisier = torch.rand(count, generator=generator) < high_noise_fraction
    return torch.where(noisier, timesteps + total // 2, timesteps)


class ParameterAverage:
    """Exponential moving average of the parameters (decay warmed up as (1 + step) / (10 + step)),
    which is what gets saved: short runs end on a noisy iterate otherwise."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        self.decay = decay
        self.averages = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def update(self, parameters: list[torch.nn.Parameter], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.averages, [p.detach() for p in parameters], 1 - decay)

    @torch.no_grad()
    def copy_to(self, parameters: list[torch.nn.Parameter]) -> None:
        for parameter, average in zip(parameters, self.averages):
            parameter.copy_(average)


def _ddpm_schedule() -> dict:
    return {k: v for k, v in SCHEDULE.items() if k != "set_alpha_to_one"}


def _batch_indices(count: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(count, (batch_size,), generator=generator)


def _random_crop(batch: torch.Tensor, fraction: float, multiple: int, generator: torch.Generator) -> torch.Tensor:
    """One random window of `fraction` of the height and width (a multiple of the latent
    downsampling), the same for the whole batch."""
    if fraction >= 1:
        return batch
    height, width = batch.shape[-2:]
    crop_h, crop_w = (max(multiple, round(fraction * size / multiple) * multiple) for size in (height, width))
    top = int(torch.randint(height - crop_h + 1, (1,), generator=generator))
    left = int(torch.randint(width - crop_w + 1, (1,), generator=generator))
    return batch[..., top : top + crop_h, left : left + crop_w]


def _flip_some(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(batch), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], batch.flip(-1), batch)


def _optimise(loss: torch.Tensor, optimizer, schedule, parameters) -> None:
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"non-finite generator loss {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, GRAD_CLIP)
    optimizer.step()
    schedule.step()


def assemble_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    for module in (vae, text_encoder, unet):
        module.eval().requires_grad_(False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SCHEDULE),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


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
    pipeline = assemble_pipeline(vae, text_encoder, tokenizer, unet)
    return TrainedGenerator(pipeline, vae_losses, unet_losses, seconds)


def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@torch.no_grad()
def generate(
    pipeline: StableDiffusionPipeline,
    prompts: list[str],
    *,
    guidance: float,
    steps: int,
    seed: int = 0,
    batch_size: int = 64,
    height: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """Images (prompts, 3, height, width) in [0, 1], float32 on the CPU; prompt i always gets the
    noise of seed + i. `height` and `width` default to the model's own size."""
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        output = pipeline(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                          output_type="pt", height=height, width=width)
        images.append(output.images.float().cpu())
    return torch.cat(images)


def save_pipeline(pipeline: StableDiffusionPipeline, directory: str | Path) -> Path:
    pipeline.save_pretrained(directory)
    return Path(directory)


def write_pretrained_pointer(directory: str | Path, pretrained: str) -> Path:
    """Marks `directory` as standing for a pretrained checkpoint instead of holding a trained model."""
    path = Path(directory) / POINTER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pretrained": pretrained}, indent=2) + "\n")
    return path


def load_pretrained_pipeline(name: str, device: torch.device | str = "cpu") -> StableDiffusionPipeline:
    """A pretrained Stable Diffusion folder or hub id (as `pipeline.hub` allows), without safety
    checker, with a DDIM scheduler as the embedded model samples with; float16 on a GPU."""
    from pipeline.hub import pretrained_kwargs

    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipeline = StableDiffusionPipeline.from_pretrained(name, safety_checker=None, requires_safety_checker=False,
                                                       dtype=dtype, **pretrained_kwargs(name))
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    for module in (pipeline.vae, pipeline.unet, pipeline.text_encoder):
        module.eval().requires_grad_(False)
    return pipeline.to(device)


PERSON_SIZE = (512, 192)  # (height, width) of a person-shaped sample from a 512-pixel Stable Diffusion


def pretrained_sample_size(pipeline: StableDiffusionPipeline) -> tuple[int, int]:
    """(height, width) to sample a pretrained model at: person-shaped (PERSON_SIZE) for a model of
    Stable Diffusion 1.x's 64-latent size, else the model's own size."""
    size = pipeline.unet.config.sample_size
    if size == 64:
        return PERSON_SIZE
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return height * pipeline.vae_scale_factor, width * pipeline.vae_scale_factor


def resolve_generator(directory: str | Path) -> str:
    """What to give `load_generator`: the pretrained checkpoint the folder points at, or the folder."""
    pointer = Path(directory) / POINTER_FILE
    if pointer.is_file():
        return json.loads(pointer.read_text())["pretrained"]
    return str(directory)


def plot_loss_curves(trained: TrainedGenerator, path: str | Path) -> None:
    """Per-step losses of both phases, with a running mean."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, losses, title in ((axes[0], trained.vae_losses, "autoencoder (L1 + KL)"),
                                (axes[1], trained.unet_losses, "UNet (noise MSE)")):
        if not losses:  # a reused, already trained autoencoder
            axis.set(title=f"{title}: not trained here")
            continue
        steps, values = zip(*losses)
        window = max(1, len(values) // 20)
        smooth = torch.tensor(values).unfold(0, window, 1).mean(1).tolist()
        axis.plot(steps, values, lw=0.6, alpha=0.4, label="step")
        axis.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
        axis.set(xlabel="step", ylabel="loss", title=title, yscale="log")
        axis.legend()
    figure.tight_layout()
    save_figure(figure, path)


def plot_no_training(pretrained: str, path: str | Path) -> None:
    """The loss-curve figure of a run that trained nothing: it says so, and names the checkpoint."""
    figure, axis = plt.subplots(figsize=(10, 3.6))
    axis.axis("off")
    axis.text(0.5, 0.6, "pretrained: no training curves", ha="center", va="center", fontsize=16)
    axis.text(0.5, 0.35, "\n".join(textwrap.wrap(f"generator.pretrained = {pretrained}: nothing was trained", 90)),
              ha="center", va="center", fontsize=10)
    save_figure(figure, path)


def plot_sample_grid(
    real: torch.Tensor, generated: torch.Tensor, prompts: list[str], path: str | Path, title: str
) -> None:
    """One row per prompt: its text, the real image it describes, then the generated images.

    `real` is (prompts, 3, H, W) in [-1, 1]; `generated` is (prompts, samples, 3, H, W) in [0, 1].
    """
    rows, samples = generated.shape[:2]
    figure, axes = plt.subplots(rows, samples + 2, figsize=(0.8 * samples + 4.6, 1.45 * rows), squeeze=False,
                                gridspec_kw={"width_ratios": [3.2, 0.55] + [0.55] * samples})
    for row, prompt in enumerate(prompts):
        axes[row][0].axis("off")
        axes[row][0].text(0, 0.5, "\n".join(textwrap.wrap(prompt, 44)), fontsize=5.5, va="center")
        pictures = [(real[row] + 1) / 2] + list(generated[row])
        for column, picture in enumerate(pictures, start=1):
            axis = axes[row][column]
            axis.imshow(picture.clamp(0, 1).permute(1, 2, 0).numpy())
            axis.set_xticks([]), axis.set_yticks([])
            if row == 0:
                axis.set_title("real" if column == 1 else f"gen {column - 1}", fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    save_figure(figure, path)


def write_sample_grid(
    pipeline: StableDiffusionPipeline,
    images: LabelledImages,
    path: str | Path,
    *,
    guidance: float,
    steps: int,
    seed: int = 0,
    prompts: int = 8,
    samples: int = 4,
    height: int | None = None,
    width: int | None = None,
) -> None:
    """Captions spread over `images`, each next to its real image and `samples` generated ones
    (at `height` x `width`, the model's own size by default)."""
    chosen = list(range(0, len(images), max(1, len(images) // prompts)))[:prompts]
    texts = [images.captions[i][0] for i in chosen]
    generated = generate(pipeline, [t for t in texts for _ in range(samples)], guidance=guidance, steps=steps,
                         seed=seed, height=height, width=width)
    generated = generated.view(len(texts), samples, *generated.shape[1:])
    title = f"real image, then generated ones (guidance {guidance}, {steps} DDIM steps)"
    plot_sample_grid(images.pixels[chosen], generated, texts, path, title)


def load_grid_images(prepared_dir: str | Path, split: str, height: int, width: int, count: int) -> LabelledImages:
    """`count` images spread over a split (by its manifest), for a sample grid, without decoding
    the rest of the split."""
    from pipeline.data.canonical import manifest_path, read_manifest

    rows = read_manifest(manifest_path(prepared_dir, split))
    if not rows:
        raise ValueError(f"no {split} images in {prepared_dir}")
    keys = [rows[i * len(rows) // count].key for i in range(min(count, len(rows)))]
    found = {s["__key__"]: s for s in iter_shard_samples(list_shards(prepared_dir, split)) if s["__key__"] in keys}
    missing = [key for key in keys if key not in found]
    if missing:
        raise ValueError(f"{split} image {missing[0]} of the manifest is not in the shards of {prepared_dir}")
    return labelled_images((_decoded(found[key]) for key in keys), height, width)
