"""Prompt-to-Prompt attention control as diffusers attention processors.

The UNet denoises sources and their edits jointly. The conditional part of its batch is the last
num_groups + num_edits rows. They are laid out in groups, each a source row followed by its edits' rows:
[source_1, edited_1a, edited_1b, ..., source_2, edited_2a, ...]. With one edit per group (the default)
this is the pair layout [source_1, edited_1, source_2, edited_2, ...]. Rows before that part are left
alone. They are the unconditional half of classifier-free guidance.

For each edit, the controller works against its group's source row. Its step counts come from
`EditSettings` (pipeline/editing/settings.py). It does four things.

- It replaces the edited branch's cross-attention by the source's for the first `cross_replace_steps`
  steps. The word-swap mapper moves the source's attention onto the edited tokens. So the layout
  follows the source wording.
- It replaces the edited branch's self-attention by the source's for the first `self_replace_steps`
  steps. This happens in layers with at most `SELF_REPLACE_MAX_QUERIES` pixels. So the structure
  follows the source. The finest layers of a large model are skipped for memory, as Prompt-to-Prompt does.
- It multiplies the edited branch's cross-attention to the new words by `reweight` at every step.
- It accumulates the cross-attention the changed words receive, over layers of at most
  `BLEND_MAX_QUERIES` pixels and over steps. The changed words are the source's old words and the
  edited branch's own new words, taken before any replacement. From `blend_start_step` on it blends
  the latents as x_edit = mask * x_edit + (1 - mask) * x_source. The mask is the union over both
  branches of the averaged map. That map is upsampled to the latent grid, dilated by one latent pixel,
  divided by its maximum and thresholded at `blend_threshold`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from pipeline.editing.alignment import TokenAlignment
from pipeline.editing.settings import EditSettings

# the largest layers (pixels) whose self-attention is replaced, and whose cross-attention the blend mask averages
SELF_REPLACE_MAX_QUERIES = 32 * 32
BLEND_MAX_QUERIES = 16 * 16


class PromptToPromptController:
    """Edits and records attention probabilities of source/edited pairs during joint denoising."""

    def __init__(
        self,
        alignments: list[TokenAlignment],
        settings: EditSettings,
        latent_size: tuple[int, int],
        mask_override: torch.Tensor | None = None,
        groups: list[int] | None = None,
    ):
        """`groups[i]` is edit i's group (its source); edits of a group are consecutive and groups
        numbered 0, 1, ... in order. None: every edit its own group (source/edited pairs)."""
        self.settings = settings
        self.latent_size = latent_size
        self.num_edits = len(alignments)
        groups = list(range(self.num_edits)) if groups is None else list(groups)
        if len(groups) != self.num_edits or groups != sorted(groups) or sorted(set(groups)) != list(range(len(set(groups)))):
            raise ValueError(f"groups must number the edits' consecutive groups 0, 1, ..., got {groups}")
        self.groups = groups
        self.num_groups = len(set(groups))
        self.num_rows = self.num_groups + self.num_edits  # conditional rows: a source per group, then its edits
        # row of each edit, and of its group's source, within the conditional rows
        self.edit_rows = torch.tensor([i + g + 1 for i, g in enumerate(groups)])
        self.source_rows = torch.tensor([groups.index(g) + g for g in groups])
        self.mapper = torch.stack([a.mapper for a in alignments])  # (edits, tokens, tokens)
        length = self.mapper.shape[-1]
        self.source_words = _indicator(length, [a.source_tokens for a in alignments])
        self.edited_words = _indicator(length, [a.edited_tokens for a in alignments])
        self.mask_override = mask_override
        self.step = 0
        self.map_sum: torch.Tensor | None = None  # (edits, 2, height, width), on the UNet's device
        self.map_count = 0
        self.last_mask: torch.Tensor | None = None

    def begin_step(self, step: int) -> None:
        self.step = step

    def wants_probabilities(self, is_cross: bool, num_queries: int) -> bool:
        """Whether this attention call must expose its probabilities (else the fast kernel runs)."""
        settings = self.settings
        if is_cross:
            return (
                self.step < settings.cross_replace_steps
                or settings.reweight != 1.0
                or (self._records_maps and num_queries <= BLEND_MAX_QUERIES)
            )
        return self.step < settings.self_replace_steps and num_queries <= SELF_REPLACE_MAX_QUERIES

    def edit_probabilities(self, probabilities: torch.Tensor, is_cross: bool) -> torch.Tensor:
        """Takes (batch, heads, queries, keys) probabilities and returns the controlled ones."""
        offset = probabilities.shape[0] - self.num_rows
        source = probabilities[offset + self.source_rows.to(probabilities.device)]  # per edit, its source row
        edit_rows = offset + self.edit_rows.to(probabilities.device)
        edited = probabilities[edit_rows]
        if is_cross:
            edited = self._control_cross(source, edited)
        elif self.step < self.settings.self_replace_steps:
            edited = source
        controlled = probabilities.clone()
        controlled[edit_rows] = edited.to(controlled.dtype)
        return controlled

    def blend(self, latents: torch.Tensor) -> torch.Tensor:
        """Local blend of the latents after a denoising step (a no-op before `blend_start_step`)."""
        if not self._blending or self.step < self.settings.blend_start_step:
            return latents
        mask = self.local_blend_mask().to(latents)
        edit_rows = self.edit_rows.to(latents.device)
        source, edited = latents[self.source_rows.to(latents.device)], latents[edit_rows]
        edited = mask * edited + (1 - mask) * source
        self.last_mask = mask
        blended = latents.clone()
        blended[edit_rows] = edited
        return blended

    def local_blend_mask(self) -> torch.Tensor:
        """(edits, 1, height, width) binary mask on the latent grid."""
        if self.mask_override is not None:
            return self.mask_override.float().expand(self.num_edits, 1, *self.latent_size)
        if self.map_sum is None:
            raise RuntimeError(f"no cross-attention layer with at most {BLEND_MAX_QUERIES} pixels ran")
        maps = self.map_sum / self.map_count
        maps = F.max_pool2d(maps, kernel_size=3, stride=1, padding=1)
        maps = maps / maps.amax(dim=(2, 3), keepdim=True).clamp(min=1e-12)
        return (maps > self.settings.blend_threshold).any(dim=1, keepdim=True).float()

    @property
    def _blending(self) -> bool:
        return self.settings.blend_threshold is not None or self.mask_override is not None

    @property
    def _records_maps(self) -> bool:
        return self.settings.blend_threshold is not None and self.mask_override is None

    def _control_cross(self, source: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
        if self._records_maps and source.shape[2] <= BLEND_MAX_QUERIES:
            self._record_word_maps(source, edited)
        if self.step < self.settings.cross_replace_steps:
            edited = torch.einsum("ehqs,est->ehqt", source, self.mapper.to(source))
        if self.settings.reweight != 1.0:
            scale = 1 + (self.settings.reweight - 1) * self.edited_words.to(edited)
            edited = edited * scale[:, None, None, :]
        return edited

    def _record_word_maps(self, source: torch.Tensor, edited: torch.Tensor) -> None:
        """Adds the head-averaged attention to the changed words, on the latent grid, to the running sum."""
        source_map = (source * self.source_words.to(source)[:, None, None, :]).sum(-1).mean(1)
        edited_map = (edited * self.edited_words.to(edited)[:, None, None, :]).sum(-1).mean(1)
        maps = torch.stack([source_map, edited_map], dim=1).float()  # (edits, 2, queries)
        maps = maps.unflatten(-1, _layer_grid(self.latent_size, maps.shape[-1]))
        maps = F.interpolate(maps, size=self.latent_size, mode="bilinear", align_corners=False)
        self.map_sum = maps if self.map_sum is None else self.map_sum + maps
        self.map_count += 1


class ControlledAttnProcessor:
    """Attention that lets a controller see and replace its probabilities; otherwise defers to `fallback`."""

    def __init__(self, controller: PromptToPromptController, fallback):
        self.controller = controller
        self.fallback = fallback

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        num_queries = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states[0, 0].numel()
        if not self.controller.wants_probabilities(is_cross, num_queries):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self._controlled_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, is_cross)

    def _controlled_attention(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, is_cross):
        """diffusers' reference attention with explicit probabilities handed to the controller."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if spatial_shape is not None:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probabilities = attn.get_attention_scores(query, key, attention_mask)
        probabilities = probabilities.unflatten(0, (batch_size, attn.heads))
        probabilities = self.controller.edit_probabilities(probabilities, is_cross).flatten(0, 1)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probabilities.to(value.dtype), value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))

        if spatial_shape is not None:
            hidden_states = hidden_states.transpose(1, 2).reshape(spatial_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def attention_control(unet: UNet2DConditionModel, controller: PromptToPromptController | None) -> Iterator[None]:
    """Installs controlled processors on every attention layer and restores the originals on exit."""
    if controller is None:
        yield
        return
    original = unet.attn_processors
    unet.set_attn_processor({name: ControlledAttnProcessor(controller, p) for name, p in original.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(original)


def _layer_grid(latent_size: tuple[int, int], num_queries: int) -> tuple[int, int]:
    """The (height, width) of a UNet level with `num_queries` pixels: the latent grid halved, rounding up."""
    height, width = latent_size
    while height * width > num_queries:
        height, width = -(-height // 2), -(-width // 2)
    if height * width != num_queries:
        raise ValueError(f"no UNet level of a {latent_size} latent has {num_queries} pixels")
    return height, width


def _indicator(length: int, positions: list[list[int]]) -> torch.Tensor:
    """(len(positions), length) with ones at each row's positions."""
    indicator = torch.zeros(len(positions), length)
    for row, columns in enumerate(positions):
        indicator[row, columns] = 1.0
    return indicator
