"""Image editing for proximity data generation: make the source image match the edited caption.

`edit_p2p` inverts the source (DDIM; negative-prompt or null-text inversion optionally) and
regenerates it jointly with the edited caption under Prompt-to-Prompt attention control and local
blending; it involves no randomness. A batch inverts each distinct (image, source caption) once and
runs one source branch for all its edits. `edit_img2img` is the SDEdit baseline: noise the source to `strength` (the share of
the DDIM steps left to run) and denoise it under the edited caption. Both work at the model's
resolution and hand back images at the source crop's size. The batch variants run several edits
through the UNet at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.editing.alignment import Span, align_word_swap
from pipeline.editing.inversion import invert
from pipeline.generator.model import DiffusionParts, back_to_crop, fit_to_model
from pipeline.editing.p2p import ControlSettings, PromptToPromptController
from pipeline.editing.sampling import denoise


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
    inversion: str | None = None,
    mask_override: torch.Tensor | None = None,
    decode_reconstruction: bool = False,
) -> list[EditResult]:
    """Inverts every distinct source once and denoises it jointly with all its edits, as one batch.

    Requests with the same image (by content) and source caption form a group: one inversion and
    one source branch serve all its edits, laid out [source_1, edit_1a, edit_1b, ..., source_2, ...].
    `inversion` is ddim, negative-prompt or null-text (None: null-text if `null_text_steps`, else
    ddim). `blend_threshold=None` turns local blending off.
    `mask_override` (broadcastable to (edits, 1, latent height, latent width)) replaces the
    attention-derived blend mask. `decode_reconstruction` also decodes the source branch into
    `EditResult.reconstruction` (one more VAE decode per group; off by default, nothing downstream reads it).
    """
    group_of, members = _groups(edits)
    leaders = [edits[group[0]] for group in members]  # one request per group, in group order
    order = [i for group in members for i in group]  # requests in row order
    fitted = [fit_to_model(edit.image, parts.image_size) for edit in leaders]
    source_latents = parts.images_to_latents([image for image, _ in fitted])
    source_embeddings = parts.encode_prompts([edit.source_caption for edit in leaders])
    edited_embeddings = parts.encode_prompts([edits[i].edited_caption for i in order])
    inverted = invert(
        parts, source_latents, source_embeddings, num_steps=num_steps, guidance=guidance,
        null_text_steps=null_text_steps, method=inversion,
    )
    settings = ControlSettings(
        cross_replace_steps=round(cross_replace_fraction * num_steps),
        self_replace_steps=round(self_replace_fraction * num_steps),
        reweight=reweight,
        blend_threshold=blend_threshold,
        blend_start_step=round(blend_start_fraction * num_steps),
    )
    alignments = [
        align_word_swap(parts.tokenizer, edits[i].source_caption, edits[i].edited_caption, edits[i].edit_spans)
        for i in order
    ]
    row_groups = [group_of[i] for i in order]
    controller = PromptToPromptController(
        alignments, settings, tuple(source_latents.shape[2:]), mask_override, groups=row_groups
    )
    null = inverted.null_embeddings
    if null is None:
        null = parts.encode_prompts([""] * len(members))
    latents = denoise(
        parts,
        _rows(inverted.start_latents, None, row_groups),
        _rows(source_embeddings, edited_embeddings, row_groups),
        [_rows(n, None, row_groups) for n in null] if isinstance(null, list) else _rows(null, None, row_groups),
        num_steps=num_steps,
        guidance=guidance,
        controller=controller,
    )
    edit_rows, source_rows = controller.edit_rows.tolist(), sorted(set(controller.source_rows.tolist()))
    images = parts.latents_to_images(latents if decode_reconstruction else latents[edit_rows])
    edited_images = [images[row] for row in edit_rows] if decode_reconstruction else images
    reconstructions = {row: images[row] for row in source_rows} if decode_reconstruction else {}
    masks = _mask_images(controller.last_mask, parts.image_size)
    results: list[EditResult | None] = [None] * len(edits)
    for position, i in enumerate(order):
        box, size = fitted[group_of[i]][1], edits[i].image.size
        source_row = int(controller.source_rows[position])
        results[i] = EditResult(
            image=back_to_crop(edited_images[position], box, size),
            mask=None if masks is None else back_to_crop(masks[position], box, size),
            reconstruction=back_to_crop(reconstructions[source_row], box, size) if decode_reconstruction else None,
        )
    return results


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


def _groups(edits: Sequence[EditRequest]) -> tuple[list[int], list[list[int]]]:
    """Each request's group (same image content and source caption), and each group's requests;
    groups are numbered in order of first appearance."""
    keys: dict[tuple, int] = {}
    group_of, members = [], []
    for index, edit in enumerate(edits):
        image = edit.image
        key = (image.mode, image.size, hashlib.sha1(image.tobytes()).digest(), edit.source_caption)
        group = keys.setdefault(key, len(keys))
        if group == len(members):
            members.append([])
        members[group].append(index)
        group_of.append(group)
    return group_of, members


def _rows(per_group: torch.Tensor, per_edit: torch.Tensor | None, row_groups: list[int]) -> torch.Tensor:
    """The controller's layout [source_1, edit_1a, edit_1b, ..., source_2, ...]: source rows from
    `per_group` (one per group), edit rows from `per_edit` (one per edit, in row order; None: the
    edit's group's row of `per_group`)."""
    picked, previous = [], None
    for position, group in enumerate(row_groups):
        if group != previous:
            picked.append(per_group[group])
            previous = group
        picked.append(per_group[group] if per_edit is None else per_edit[position])
    return torch.stack(picked)


def _mask_images(mask: torch.Tensor | None, image_size: tuple[int, int]) -> list[Image.Image] | None:
    """The latent-grid blend mask as black/white images at the model's resolution."""
    if mask is None:
        return None
    width, height = image_size
    pixels = F.interpolate(mask.float().cpu(), size=(height, width), mode="nearest")[:, 0]
    return [Image.fromarray((plane.numpy() * 255).astype("uint8")) for plane in pixels]
