"""Hardness-aware contrastive loss for the dual encoder.

Background: docs/design.md, section 1.2, "Hardness-aware, identity-aware contrastive loss".

For an anchor i (an image, or a caption in the other direction) and the in-batch candidates j
of the other modality, with s_ij the cosine similarity and tau the temperature:

    z_ij = s_ij / tau
    q_ij = target distribution: uniform over the anchor's positives P(i) (every candidate with the
           anchor's person id, or only its own pair), or a row of the caller's soft `targets`
    N(i) = {j : q_ij = 0}, the negatives, n_i = |N(i)|
    w_ij = n_i * exp(beta * s_ij) / sum_{k in N(i)} exp(beta * s_ik)  for j in N(i)  (s detached)
    w_ij = 1                                                          for j in P(i)
    loss_i = -sum_j q_ij * log( w_ij exp(z_ij) / sum_k w_ik exp(z_ik) )
           = -sum_j q_ij * z_ij + log( sum_{j in P(i)} exp(z_ij) + sum_{j in N(i)} w_ij exp(z_ij) )

This is soft-label cross-entropy over the logits z_ij + log w_ij. The weights of an anchor's
negatives average to 1. So beta = 0 gives plain (multi-positive, soft-label) InfoNCE, and a larger
beta moves the gradient towards the hard negatives (high similarity, other identity). The loss is
the mean of loss_i over anchors, averaged over the image-to-text and text-to-image directions.

Under `torch.distributed`, candidates come from every rank while anchors stay local. The gather's
backward sums the gradients that all ranks send to this rank's embeddings. So after DDP averages
the parameter gradients, they equal the single-process gradient of the loss over the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import LossConfig


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all ranks along dim 0, in rank order.

    Gradients flow back to every rank's input: each rank receives the sum of the gradients that
    all ranks computed for its slice. Tensors without gradients (ids, targets) gather the same
    way. Every rank must pass the same shape. Without an initialised process group (or with one
    process) the tensor comes back unchanged.
    """
    if not _is_distributed():
        return tensor
    return torch.cat(dist_functional.all_gather(tensor), dim=0)


def hardness_log_weights(similarity: torch.Tensor, negatives: torch.Tensor, beta: float) -> torch.Tensor:
    """log w_ij: log(n_i) + beta * s_ij - logsumexp_{k in N(i)} beta * s_ik on negatives, 0 elsewhere."""
    scores = (beta * similarity.detach()).masked_fill(~negatives, float("-inf"))
    num_negatives = negatives.sum(dim=1, keepdim=True).clamp(min=1).to(similarity.dtype)
    log_weights = scores - scores.logsumexp(dim=1, keepdim=True) + num_negatives.log()
    # Rows without negatives give -inf - -inf = nan there; only negative entries are kept.
    return log_weights.masked_fill(~negatives, 0.0)


def directional_loss(
    similarity: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor | float, beta: float
) -> torch.Tensor:
    """Mean over anchors (rows) of the hardness-weighted soft-label cross-entropy; targets rows sum to 1."""
    logits = similarity / temperature + hardness_log_weights(similarity, targets == 0, beta)
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()


def _normalise_rows(match: torch.Tensor) -> torch.Tensor:
    return match / match.sum(dim=1, keepdim=True)


class HardnessAwareContrastiveLoss(nn.Module):
    """Symmetric hardness-aware contrastive loss (formulas in the module docstring)."""

    def __init__(self, beta: float = 0.0, identity_positives: bool = True):
        super().__init__()
        self.beta = beta
        self.identity_positives = identity_positives

    @classmethod
    def from_config(cls, cfg: LossConfig) -> HardnessAwareContrastiveLoss:
        return cls(beta=cfg.beta, identity_positives=cfg.identity_positives)

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        person_ids: torch.Tensor,
        temperature: torch.Tensor | float,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The scalar loss for this rank's anchors against the candidates of all ranks.

        Arguments:
        - image_emb, text_emb are [B, D] and L2-normalised. Row k of each forms a pair.
        - person_ids is [B].
        - temperature is a float, or a scalar tensor that receives gradients.
        - targets is an optional [B, B_global] image-to-text target distribution (rows sum to 1),
          e.g. for feature mixup. It replaces the id-derived targets. Text anchor k uses column k
          of the global targets, renormalised, so every column needs a positive entry.

        B_global is B times the world size, so every rank must pass the same local batch size.
        """
        # Similarities and softmax in float32, whatever autocast does around this call.
        with torch.autocast(device_type=image_emb.device.type, enabled=False):
            image_emb, text_emb = image_emb.float(), text_emb.float()
            if isinstance(temperature, torch.Tensor):
                temperature = temperature.float()
            all_image_emb, all_text_emb = gather_with_grad(image_emb), gather_with_grad(text_emb)
            image_to_text, text_to_image = self._targets(person_ids, targets)
            image_loss = directional_loss(image_emb @ all_text_emb.T, image_to_text, temperature, self.beta)
            text_loss = directional_loss(text_emb @ all_image_emb.T, text_to_image, temperature, self.beta)
            return (image_loss + text_loss) / 2

    def _targets(
        self, person_ids: torch.Tensor, targets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-to-text and text-to-image target rows for the local anchors, [B, B_global] each."""
        batch_size = person_ids.shape[0]
        offset = dist.get_rank() * batch_size if _is_distributed() else 0
        if targets is not None:
            all_targets = gather_with_grad(targets.detach().float())
            image_to_text = all_targets[offset : offset + batch_size]
            text_to_image = all_targets[:, offset : offset + batch_size].T
            if (text_to_image.sum(dim=1) <= 0).any():
                raise ValueError("targets: every caption (column) needs a positive entry")
            return _normalise_rows(image_to_text), _normalise_rows(text_to_image)
        all_ids = gather_with_grad(person_ids)
        if self.identity_positives:
            match = person_ids[:, None] == all_ids[None, :]
        else:
            own_pair = torch.arange(batch_size, device=person_ids.device) + offset
            match = F.one_hot(own_pair, num_classes=all_ids.shape[0])
        # The same-id relation is symmetric, so both directions share one matrix.
        target = _normalise_rows(match.float())
        return target, target

    @torch.no_grad()
    def similarity_stats(
        self, image_emb: torch.Tensor, text_emb: torch.Tensor, person_ids: torch.Tensor
    ) -> dict[str, float]:
        """Diagnostics on the local batch, image-to-text: mean positive and mean hardest-negative cosine."""
        similarity = image_emb.float() @ text_emb.float().T
        positives = person_ids[:, None] == person_ids[None, :]
        if not self.identity_positives:
            positives = torch.eye(len(person_ids), dtype=torch.bool, device=person_ids.device)
        hardest_negative = similarity.masked_fill(positives, float("-inf")).amax(dim=1)
        has_negative = hardest_negative > float("-inf")
        return {
            "positive_similarity": similarity[positives].mean().item(),
            "hardest_negative_similarity": hardest_negative[has_negative].mean().item(),
        }


def mixed_pair_targets(
    person_ids: torch.Tensor, permutation: torch.Tensor, lam: torch.Tensor, identity_positives: bool = True
) -> torch.Tensor:
    """Targets [B, B_global] for feature mixup.

    Image i and caption i of this rank's batch are both `lam_i * sample_i + (1 - lam_i) * sample_perm(i)`,
    with the same lam and partner in both towers. A mixed image and a mixed caption match by the mass
    their components share:

        affinity(i, j) = sum over components a of i and b of j of w_ia * w_jb * match(a, b)

    Here w_ii = lam_i, w_i,perm(i) = 1 - lam_i, and match means the same person id (or the same pair).
    Rows are normalised by the loss. `permutation` indexes this rank's batch. lam is [B]."""
    batch_size = person_ids.shape[0]
    offset = dist.get_rank() * batch_size if _is_distributed() else 0
    all_ids = gather_with_grad(person_ids)
    all_partners = gather_with_grad(permutation.to(person_ids.device) + offset)
    all_lam = gather_with_grad(lam.float().to(person_ids.device))
    total = all_ids.shape[0]
    weights = torch.zeros(total, total, device=person_ids.device)
    rows = torch.arange(total, device=person_ids.device)
    weights[rows, rows] += all_lam
    weights[rows, all_partners] += 1 - all_lam
    if identity_positives:
        match = (all_ids[:, None] == all_ids[None, :]).float()
    else:
        match = torch.eye(total, device=person_ids.device)
    affinity = weights @ match @ weights.T
    return affinity[offset : offset + batch_size]
