"""Pictures of the generator: seeded sample grids from prompts, and its training curves."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import torch
from diffusers import (
    StableDiffusionPipeline,
)

from pipeline.plots import plt, save_figure
from pipeline.generator.data import LabelledImages
from pipeline.generator.training import TrainedGenerator

log = logging.getLogger(__name__)


@torch.no_grad()
def sample_images(
    sd: StableDiffusionPipeline,
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
    sd.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        output = sd(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                          output_type="pt", height=height, width=width)
        images.append(output.images.float().cpu())
    return torch.cat(images)

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
    sd: StableDiffusionPipeline,
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
    generated = sample_images(sd, [t for t in texts for _ in range(samples)], guidance=guidance, steps=steps,
                         seed=seed, height=height, width=width)
    generated = generated.view(len(texts), samples, *generated.shape[1:])
    title = f"real image, then generated ones (guidance {guidance}, {steps} DDIM steps)"
    plot_sample_grid(images.pixels[chosen], generated, texts, path, title)
