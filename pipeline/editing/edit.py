"""Image editing for proximity data generation: make the source image match the edited caption.

`edit_p2p_batch` inverts each distinct (image, source caption) once, by DDIM, negative-prompt or
null-text. It then regenerates it jointly with all its edited captions under Prompt-to-Prompt
attention control and local blending. It works in three steps (`_invert`, `_control`, `_decode`)
and involves no randomness.

`edit_img2img_batch` is the SDEdit baseline. It noises the source to `strength` and denoises it
under the edited caption.

Both take one `EditSettings` (pipeline/editing/settings.py) and work at the model's resolution.
Both hand back images at the source crop's size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.editing.alignment import Span, align_word_swap
from pipeline.editing.inversion import Inversion, invert
from pipeline.editing.p2p import PromptToPromptController
from pipeline.editing.sampling import denoise
from pipeline.editing.settings import EditSettings
from pipeline.generator.model import DiffusionParts, back_to_crop, fit_to_model


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
    settings: EditSettings,
    **options,
) -> EditResult:
    """Prompt-to-Prompt edit of one image; `options` are those of `edit_p2p_batch`."""
    request = EditRequest(image, source_caption, edited_caption, edit_spans)
    return edit_p2p_batch(parts, [request], settings, **options)[0]


def edit_p2p_batch(
    parts: DiffusionParts,
    edits: Sequence[EditRequest],
    settings: EditSettings,
    *,
    mask_override: torch.Tensor | None = None,
    decode_reconstruction: bool = False,
) -> list[EditResult]:
    """Inverts every distinct source once and denoises it jointly with all its edits, as one batch.

    Requests with the same image (by content) and source caption form a group. One inversion and
    one source branch serve all its edits, laid out [source_1, edit_1a, edit_1b, ..., source_2, ...].
    `mask_override` replaces the attention-derived blend mask. It must be broadcastable to
    (edits, 1, latent height, latent width). `decode_reconstruction` also decodes the source branch
    into `EditResult.reconstruction`. That costs one more VAE decode per group, and nothing
    downstream reads it.
    """
    batch = _Batch.of(edits)
    inverted = _invert(parts, batch, settings)
    controller = _control(parts, batch, settings, inverted.latent_size, mask_override)
    rows = batch.row_groups
    null = inverted.inversion.null_embeddings
    if null is None:
        null = parts.encode_prompts([""] * len(batch.members))
    latents = denoise(
        parts,
        _rows(inverted.inversion.start_latents, None, rows),
        _rows(inverted.source_embeddings, inverted.edited_embeddings, rows),
        [_rows(n, None, rows) for n in null] if isinstance(null, list) else _rows(null, None, rows),
        num_steps=settings.num_steps,
        guidance=settings.guidance,
        controller=controller,
    )
    return _decode(parts, batch, inverted.fitted, latents, controller, decode_reconstruction)


@dataclass(frozen=True)
class _Batch:
    """The requests, grouped by source (same image content and source caption), in row order."""

    edits: Sequence[EditRequest]
    group_of: list[int]  # each request's group
    members: list[list[int]]  # each group's requests; groups in order of first appearance
    order: list[int]  # the requests in row order
    row_groups: list[int]  # the group of each request in row order

    @classmethod
    def of(cls, edits: Sequence[EditRequest]) -> _Batch:
        group_of, members = _groups(edits)
        order = [i for group in members for i in group]
        return cls(edits, group_of, members, order, [group_of[i] for i in order])

    @property
    def leaders(self) -> list[EditRequest]:
        """One request per group, in group order."""
        return [self.edits[group[0]] for group in self.members]

    @property
    def in_row_order(self) -> list[EditRequest]:
        return [self.edits[i] for i in self.order]


@dataclass(frozen=True)
class _Inverted:
    fitted: list[tuple[Image.Image, tuple[int, int, int, int]]]  # each group's source on the canvas, its box
    source_embeddings: torch.Tensor  # one per group
    edited_embeddings: torch.Tensor  # one per request, in row order
    inversion: Inversion  # of the groups' sources
    latent_size: tuple[int, int]


def _invert(parts: DiffusionParts, batch: _Batch, settings: EditSettings) -> _Inverted:
    """Step 1: fits each group's source to the model, encodes it and the captions, and inverts it."""
    fitted = [fit_to_model(edit.image, parts.image_size) for edit in batch.leaders]
    source_latents = parts.images_to_latents([image for image, _ in fitted])
    source_embeddings = parts.encode_prompts([edit.source_caption for edit in batch.leaders])
    edited_embeddings = parts.encode_prompts([edit.edited_caption for edit in batch.in_row_order])
    inversion = invert(parts, source_latents, source_embeddings, settings)
    return _Inverted(fitted, source_embeddings, edited_embeddings, inversion, tuple(source_latents.shape[2:]))


def _control(
    parts: DiffusionParts,
    batch: _Batch,
    settings: EditSettings,
    latent_size: tuple[int, int],
    mask_override: torch.Tensor | None,
) -> PromptToPromptController:
    """Step 2: the attention controller of the joint denoising, from each edit's word-swap alignment."""
    alignments = [
        align_word_swap(parts.tokenizer, edit.source_caption, edit.edited_caption, edit.edit_spans)
        for edit in batch.in_row_order
    ]
    return PromptToPromptController(alignments, settings, latent_size, mask_override, groups=batch.row_groups)


def _decode(
    parts: DiffusionParts,
    batch: _Batch,
    fitted: list[tuple[Image.Image, tuple[int, int, int, int]]],
    latents: torch.Tensor,
    controller: PromptToPromptController,
    decode_reconstruction: bool,
) -> list[EditResult]:
    """Step 3: the edit rows (and, if asked, the source rows) decoded, with the blend masks, each back
    at its source crop's size; results in request order."""
    edit_rows, source_rows = controller.edit_rows.tolist(), sorted(set(controller.source_rows.tolist()))
    images = parts.latents_to_images(latents if decode_reconstruction else latents[edit_rows])
    edited_images = [images[row] for row in edit_rows] if decode_reconstruction else images
    reconstructions = {row: images[row] for row in source_rows} if decode_reconstruction else {}
    masks = _mask_images(controller.last_mask, parts.image_size)
    results: list[EditResult | None] = [None] * len(batch.edits)
    for position, i in enumerate(batch.order):
        box, size = fitted[batch.group_of[i]][1], batch.edits[i].image.size
        source_row = int(controller.source_rows[position])
        results[i] = EditResult(
            image=back_to_crop(edited_images[position], box, size),
            mask=None if masks is None else back_to_crop(masks[position], box, size),
            reconstruction=back_to_crop(reconstructions[source_row], box, size) if decode_reconstruction else None,
        )
    return results


def edit_img2img(
    parts: DiffusionParts, image: Image.Image, edited_caption: str, settings: EditSettings, *, seed: int
) -> EditResult:
    """SDEdit of one image."""
    return edit_img2img_batch(parts, [image], [edited_caption], settings, seed=seed)[0]


def edit_img2img_batch(
    parts: DiffusionParts,
    images: Sequence[Image.Image],
    edited_captions: Sequence[str],
    settings: EditSettings,
    *,
    seed: int | Sequence[int],
) -> list[EditResult]:
    """SDEdit of several images in one batch, `settings.strength` of `settings.num_steps` steps.

    Each image's noise comes from a CPU RNG seeded with its own entry of `seed`. For a single `seed`,
    the first image uses `seed` itself and image i uses `seed + i`.

    Written with the scheduler rather than diffusers' img2img pipeline, which rejects the
    (height, width) `sample_size` of non-square person models.
    """
    strength, num_steps = settings.strength, settings.num_steps
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
        guidance=settings.guidance,
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
