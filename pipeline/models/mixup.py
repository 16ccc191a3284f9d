"""Feature-level mixup: hidden states of sample i and sample perm[i] mixed after encoder layer k.

Applied through hooks on a tower's encoder layers, so the towers stay unmodified
transformers models. A forward hook on layer k mixes its output. For text, forward
pre-hooks on the later layers mix the attention masks too: a key token's attention
weight is scaled by how much of it the mix holds (1 when both captions have a token
there, lam or 1 - lam when only one does). So lam = 1 leaves a sample exactly as it
was and lam = 0 turns it exactly into its partner, whatever the two captions' lengths.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FeatureMix:
    """Mix `lam * h[i] + (1 - lam) * h[permutation[i]]` at the output of encoder layer `layer` (0-based).

    `lam` is a float or a tensor of shape [B] (one coefficient per sample).
    """

    layer: int
    permutation: torch.Tensor
    lam: float | torch.Tensor

    def _lam_like(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        lam = torch.as_tensor(self.lam, dtype=dtype, device=tensor.device)
        return lam.reshape(-1, *([1] * (tensor.dim() - 1)))

    def blend(self, own: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        """`lam * own + (1 - lam) * partner`, row by row."""
        lam = self._lam_like(own, own.dtype)
        return lam * own + (1 - lam) * partner

    def mix(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.blend(hidden_states, hidden_states[self.permutation])

    def mix_pooling_weights(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """0/1 token mask [B, L] -> how much of a real token each mixed position holds."""
        return self.mix(attention_mask.float())

    def mix_attention_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Boolean (True = attend) or additive mask [B, 1, Q, K] -> additive mask in `dtype`,
        log(lam * visible_i + (1 - lam) * visible_perm[i])."""
        if mask.shape[0] == 1:  # one mask broadcast over the batch: the same for both samples
            return mask
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
        lam = self._lam_like(mask, mask.dtype)
        return torch.logaddexp(mask + lam.log(), mask[self.permutation] + (1 - lam).log()).to(dtype)


@contextmanager
def feature_mixing(layers: nn.ModuleList, mix: FeatureMix | None, mix_attention_masks: bool) -> Iterator[None]:
    """Within the block, forward passes through `layers` apply `mix`; no-op when `mix` is None."""
    if mix is None:
        yield
        return
    if not 0 <= mix.layer < len(layers):
        raise ValueError(f"mix layer {mix.layer} is outside the encoder's {len(layers)} layers")

    def mix_output(module, args, output):
        return mix.mix(output)

    def mix_mask(module, args, kwargs):
        dtype = args[0].dtype
        if len(args) > 1 and args[1] is not None:
            args = (args[0], mix.mix_attention_mask(args[1], dtype), *args[2:])
        elif kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = mix.mix_attention_mask(kwargs["attention_mask"], dtype)
        return args, kwargs

    handles = [layers[mix.layer].register_forward_hook(mix_output)]
    if mix_attention_masks:
        handles += [layer.register_forward_pre_hook(mix_mask, with_kwargs=True) for layer in layers[mix.layer + 1 :]]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
