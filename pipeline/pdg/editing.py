"""Image editing for proximity data generation: make the source image match the edited caption.

`edit_p2p` inverts the source (DDIM, optionally null-text optimised) and regenerates it jointly
with the edited caption under Prompt-to-Prompt attention control and local blending; it involves
no randomness. `edit_img2img` is the SDEdit baseline: noise the source to `strength` (the share of
the DDIM steps left to run) and denoise it under the edited caption. Both work at the model's
resolution and hand back images at the source crop's size. The batch variants run several edits
through the UNet at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .alignment import Span, align_word_swap
from .inversion import invert
from .model import DiffusionParts, back_to_crop, fit_to_model
from .p2p import ControlSettings, PromptToPromptController
from .sampling import denoise


@dataclass(frozen=True)
class EditRequest:
    """One edit: the source crop, its caption, the edited caption and the swapped words' spans."""

    image: Image.Image
    source_caption: str
    edited_caption: str
    edit_spans: Sequence[tuple[Span, Span]]  # (source span, edited span) per swapped word


@dataclass
class EditResult:
    image: Image.Image  # the edit, at the source image's size
    mask: Image.Image | None = None  # local-blend mask at the source size, white where edits were allowed
    reconstruction: Image.Image | None = None  # the source branch of the joint denoising


def edit_p2p(
    parts: DiffusionParts,
    image: Image.Image,
    source_caption: str,
    edited_caption: str,
    edit_spans: Sequence[tuple[Span, Span]],
    **options,
) -> EditResult:
    """Prompt-to-Prompt edit of one image; `options` are those of `edit_p2p_batch`."""
    return edit_p2p_batch(parts, [EditRequest(image, source_caption, edited_caption, edit_spans)], **options)[0]


def edit_p2p_batch(
    parts: DiffusionParts,
    edits: Sequence[EditRequest],
    *,
    num_steps: int = 50,
    guidance: float = 7.5,
    cross_replace_fraction: float = 0.8,
    self_replace_fraction: float = 0.4,
    blend_threshold: float | None = 0.3,
    blend_start_fraction: float = 0.2,
    reweight: float = 2.0,
    null_text_steps: int = 0,
    attention_control: bool = True,
    mask_override: torch.Tensor | None = None,
) -> list[EditResult]:
    """Inverts every source and denoises all source/edited pairs as one batch.

    `blend_threshold=None` turns local blending off; `attention_control=False` keeps the joint
    denoising (and blending) but injects and reweights no attention, for ablations.
    `mask_override` (broadcastable to (edits, 1, latent height, latent width)) replaces the
    attention-derived blend mask.
    """
    fitted = [fit_to_model(edit.image, parts.image_size) for edit in edits]
    source_latents = parts.images_to_latents([image for image, _ in fitted])
    source_embeddings = parts.encode_prompts([edit.source_caption for edit in edits])
    edited_embeddings = parts.encode_prompts([edit.edited_caption for edit in edits])
    inversion = invert(
        parts, source_latents, source_embeddings, num_steps=num_steps, guidance=guidance,
        null_text_steps=null_text_steps,
    )
    settings = ControlSettings(
        cross_replace_steps=round(cross_replace_fraction * num_steps) if attention_control else 0,
        self_replace_steps=round(self_replace_fraction * num_steps) if attention_control else 0,
        reweight=reweight if attention_control else 1.0,
        blend_threshold=blend_threshold,
        blend_start_step=round(blend_start_fraction * num_steps),
    )
    alignments = [
        align_word_swap(parts.tokenizer, edit.source_caption, edit.edited_caption, edit.edit_spans) for edit in edits
    ]
    controller = PromptToPromptController(alignments, settings, tuple(source_latents.shape[2:]), mask_override)
    null = parts.encode_prompts([""] * len(edits)) if inversion.null_embeddings is None else inversion.null_embeddings
    latents = denoise(
        parts,
        _pairs(inversion.start_latents, inversion.start_latents),
        _pairs(source_embeddings, edited_embeddings),
        [_pairs(n, n) for n in null] if isinstance(null, list) else _pairs(null, null),
        num_steps=num_steps,
        guidance=guidance,
        controller=controller,
    )
    images = parts.latents_to_images(latents)
    masks = _mask_images(controller.last_mask, parts.image_size)
    return [
        EditResult(
            image=back_to_crop(images[2 * i + 1], box, edit.image.size),
            mask=None if masks is None else back_to_crop(masks[i], box, edit.image.size),
            reconstruction=back_to_crop(images[2 * i], box, edit.image.size),
        )
        for i, (edit, (_, box)) in enumerate(zip(edits, fitted))
    ]


def edit_img2img(
    parts: DiffusionParts,
    image: Image.Image,
    edited_caption: str,
    *,
    strength: float = 0.6,
    num_steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
) -> EditResult:
    """SDEdit of one image."""
    return edit_img2img_batch(
        parts, [image], [edited_caption], strength=strength, num_steps=num_steps, guidance=guidance, seed=seed
    )[0]


def edit_img2img_batch(
    parts: DiffusionParts,
    images: Sequence[Image.Image],
    edited_captions: Sequence[str],
    *,
    strength: float = 0.6,
    num_steps: int = 50,
    guidance: float = 7.5,
    seed: int | Sequence[int] = 0,
) -> list[EditResult]:
    """SDEdit of several images in one batch; each image's noise comes from a CPU generator seeded
    with its own entry of `seed` (or with `seed` itself for the first, `seed + i` for the others).

    Written with the scheduler rather than diffusers' img2img pipeline, which rejects the
    (height, width) `sample_size` of non-square person models.
    """
    fitted = [fit_to_model(image, parts.image_size) for image in images]
    source_latents = parts.images_to_latents([image for image, _ in fitted])
    noised_steps = min(round(strength * num_steps), num_steps)
    if noised_steps == 0:
        raise ValueError(f"strength {strength} leaves none of the {num_steps} steps to run")
    skipped_steps = num_steps - noised_steps
    parts.scheduler.set_timesteps(num_steps, device=parts.device)
    seeds = [seed + i for i in range(len(images))] if isinstance(seed, int) else list(seed)
    noise = torch.stack([
        torch.randn(source_latents.shape[1:], generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32)
        for s in seeds
    ])
    start_timestep = parts.scheduler.timesteps[skipped_steps : skipped_steps + 1]
    latents = parts.scheduler.add_noise(source_latents, noise.to(source_latents), start_timestep)
    latents = denoise(
        parts,
        latents,
        parts.encode_prompts(list(edited_captions)),
        parts.encode_prompts([""] * len(images)),
        num_steps=num_steps,
        guidance=guidance,
        first_step=skipped_steps,
    )
    outputs = parts.latents_to_images(latents)
    return [
        EditResult(image=back_to_crop(output, box, image.size))
        for output, image, (_, box) in zip(outputs, images, fitted)
    ]


def _pairs(sources: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
    """Interleaves two batches as [source_1, edit_1, source_2, edit_2, ...], the controller's layout."""
    return torch.stack([sources, edits], dim=1).flatten(0, 1)


def _mask_images(mask: torch.Tensor | None, image_size: tuple[int, int]) -> list[Image.Image] | None:
    """The latent-grid blend mask as black/white images at the model's resolution."""
    if mask is None:
        return None
    width, height = image_size
    pixels = F.interpolate(mask.float().cpu(), size=(height, width), mode="nearest")[:, 0]
    return [Image.fromarray((plane.numpy() * 255).astype("uint8")) for plane in pixels]
