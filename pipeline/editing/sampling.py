"""Deterministic DDIM sampling with classifier-free guidance, optionally under attention control.

Latents and embeddings are float32 throughout. `DiffusionParts.predict_noise` casts to the UNet's
dtype for the call only, so the DDIM steps and the blending stay in float32 under a half UNet.
"""

from __future__ import annotations

import torch

from pipeline.generator.model import DiffusionParts
from pipeline.editing.p2p import PromptToPromptController, attention_control

# The unconditional embedding: one tensor for every step, or (null-text inversion) one per step.
NullEmbeddings = torch.Tensor | list[torch.Tensor]


def guided_noise(
    parts: DiffusionParts,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    text_embeddings: torch.Tensor,
    null_embeddings: torch.Tensor,
    guidance: float,
    conditional: torch.Tensor | None = None,
) -> torch.Tensor:
    """The guided noise prediction; guidance 1 needs only the conditional pass. A `conditional`
    prediction already computed for these latents and this step is reused (one UNet pass, not two)."""
    if guidance == 1:
        return conditional if conditional is not None else parts.predict_noise(latents, timestep, text_embeddings)
    if conditional is not None:
        unconditional = parts.predict_noise(latents, timestep, null_embeddings)
    else:
        noise = parts.predict_noise(
            torch.cat([latents, latents]), timestep, torch.cat([null_embeddings, text_embeddings])
        )
        unconditional, conditional = noise.chunk(2)
    return unconditional + guidance * (conditional - unconditional)


@torch.no_grad()
def denoise(
    parts: DiffusionParts,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    null_embeddings: NullEmbeddings,
    *,
    num_steps: int,
    guidance: float,
    controller: PromptToPromptController | None = None,
    first_step: int = 0,
) -> torch.Tensor:
    """Runs DDIM steps `first_step` to `num_steps - 1` (noisiest timestep first) down to clean latents."""
    parts.scheduler.set_timesteps(num_steps, device=parts.device)
    with attention_control(parts.unet, controller):
        for step, timestep in enumerate(parts.scheduler.timesteps[first_step:], start=first_step):
            null = null_embeddings[step] if isinstance(null_embeddings, list) else null_embeddings
            if controller is not None:
                controller.begin_step(step)
            noise = guided_noise(parts, latents, timestep, text_embeddings, null, guidance)
            latents = parts.scheduler.step(noise, timestep, latents).prev_sample
            if controller is not None:
                latents = controller.blend(latents)
    return latents
