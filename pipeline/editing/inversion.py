"""DDIM inversion of source latents, and the unconditional embedding to sample it back with.

Plain DDIM inversion (guidance 1) gives a noise latent that regenerates the source under the
source caption without guidance. Classifier-free guidance pulls the trajectory away, though.
`EditSettings.inversion` picks one of two remedies.
- Negative-prompt (Miyake et al., 2023). The source caption's own embedding serves as the
  unconditional one while sampling. So the source branch's guided noise is its conditional noise,
  and it retraces the inversion. It needs no optimisation and no extra UNet calls.
- Null-text (Mokady et al., 2023). The unconditional embedding is tuned, one per timestep, so that
  each guided DDIM step lands on the inverted trajectory's next latent. The model and the caption
  stay untouched. It runs in float32 (the embedding, Adam, the DDIM step). Only the UNet call is cast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.generator.model import DiffusionParts
from pipeline.editing.sampling import guided_noise
from pipeline.editing.settings import EditSettings

# Null-text optimisation stops a timestep early once every latent is this close (mean squared error),
# a bound that loosens by `_EARLY_STOP_SLOPE` per step as the paper's does.
_EARLY_STOP = 1e-5
_EARLY_STOP_SLOPE = 2e-5


@dataclass
class Inversion:
    trajectory: list[torch.Tensor]  # latents from clean (first) to noisiest (last), num_steps + 1 of them
    # the unconditional embedding to sample with: one per sampling step, noisiest first (null-text),
    # one for every step (negative-prompt: the source caption's), or None (ddim: the empty prompt's)
    null_embeddings: list[torch.Tensor] | torch.Tensor | None

    @property
    def start_latents(self) -> torch.Tensor:
        return self.trajectory[-1]


@torch.no_grad()
def ddim_invert(
    parts: DiffusionParts, latents: torch.Tensor, text_embeddings: torch.Tensor, num_steps: int
) -> list[torch.Tensor]:
    """The deterministic DDIM trajectory from `latents` up to the noisiest of `num_steps` timesteps."""
    scheduler = parts.inverse_scheduler()
    scheduler.set_timesteps(num_steps, device=parts.device)
    trajectory = [latents]
    for timestep in scheduler.timesteps:
        noise = parts.predict_noise(latents, timestep, text_embeddings)
        latents = scheduler.step(noise, timestep, latents).prev_sample
        trajectory.append(latents)
    return trajectory


def optimize_null_text(
    parts: DiffusionParts,
    trajectory: list[torch.Tensor],
    text_embeddings: torch.Tensor,
    null_embedding: torch.Tensor,
    *,
    guidance: float,
    inner_steps: int,
    learning_rate: float = 1e-2,
) -> list[torch.Tensor]:
    """Per-timestep unconditional embeddings under which guided sampling retraces `trajectory`.

    Each batch item's embedding is fitted to its own latents only, since the loss is a sum over items.
    Per step and batch item the UNet runs these rows.
    - 1 conditional row.
    - At most `inner_steps` unconditional rows. There are fewer once the early stop fires.
    - 1 unconditional row for the step taken. The conditional row is reused for it.
    """
    scheduler = parts.scheduler
    scheduler.set_timesteps(len(trajectory) - 1, device=parts.device)
    num_steps = len(scheduler.timesteps)
    latents, null = trajectory[-1], null_embedding.detach()
    optimized = []
    for step, timestep in enumerate(scheduler.timesteps):
        target = trajectory[num_steps - step - 1]
        with torch.no_grad():
            conditional = parts.predict_noise(latents, timestep, text_embeddings)
        null = null.clone().requires_grad_(True)
        # the paper's schedule (1e-2 falling to half over the steps), written for any step count
        optimizer = torch.optim.Adam([null], lr=learning_rate * (1 - step / (2 * num_steps)))
        for _ in range(inner_steps):
            unconditional = parts.predict_noise(latents, timestep, null)
            noise = unconditional + guidance * (conditional - unconditional)
            reached = scheduler.step(noise, timestep, latents).prev_sample
            errors = F.mse_loss(reached, target, reduction="none").flatten(1).mean(1)
            optimizer.zero_grad()
            errors.sum().backward()
            optimizer.step()
            if errors.max().item() < _EARLY_STOP + _EARLY_STOP_SLOPE * step:
                break
        null = null.detach()
        optimized.append(null)
        with torch.no_grad():
            noise = guided_noise(parts, latents, timestep, text_embeddings, null, guidance, conditional)
            latents = scheduler.step(noise, timestep, latents).prev_sample
    return optimized


def invert(
    parts: DiffusionParts, latents: torch.Tensor, text_embeddings: torch.Tensor, settings: EditSettings
) -> Inversion:
    """DDIM inversion under the source caption in `settings.num_steps` steps, then by `settings.inversion`.

    - ddim does nothing more.
    - negative-prompt uses the caption's embedding as the unconditional one.
    - null-text runs `settings.null_text_steps` Adam steps per timestep, at `settings.guidance`."""
    trajectory = ddim_invert(parts, latents, text_embeddings, settings.num_steps)
    if settings.inversion == "negative-prompt":
        return Inversion(trajectory, text_embeddings)
    if settings.inversion == "ddim" or settings.guidance == 1:
        return Inversion(trajectory, None)
    null = parts.encode_prompts([""] * latents.shape[0])
    nulls = optimize_null_text(
        parts, trajectory, text_embeddings, null, guidance=settings.guidance, inner_steps=settings.null_text_steps
    )
    return Inversion(trajectory, nulls)
