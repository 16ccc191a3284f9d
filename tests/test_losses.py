"""The hardness-aware contrastive loss against independent formulas, in one and two processes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.core.config import LossConfig
from pipeline.losses import HardnessAwareContrastiveLoss, gather_with_grad
from tiny_project import free_port

# Rows are images, columns captions; similarity = image_emb @ text_emb.T.
SIMILARITY = [
    [0.9, 0.5, 0.1],
    [0.4, 0.8, 0.2],
    [0.3, 0.6, 0.7],
]


def embeddings_with_similarity(similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image embeddings = identity, so image_emb @ text_emb.T is exactly `similarity`."""
    return torch.eye(similarity.shape[0]), similarity.T


def random_batch(batch_size: int = 8, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch_size, dim, generator=generator), dim=1)
    text = F.normalize(image + 0.8 * torch.randn(batch_size, dim, generator=generator), dim=1)
    return image, text


def plain_info_nce(image: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = image @ text.T / temperature
    labels = torch.arange(len(image))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def expected_anchor_loss(
    positive_sims: list[float], negative_sims: list[float], tau: float, beta: float
) -> float:
    """-mean_{P} s/tau + log(sum_P exp(s/tau) + sum_N w exp(s/tau)), w = n exp(beta s) / sum_N exp(beta s)."""
    normaliser = sum(math.exp(beta * s) for s in negative_sims)
    weights = [len(negative_sims) * math.exp(beta * s) / normaliser for s in negative_sims]
    denominator = sum(math.exp(s / tau) for s in positive_sims)
    denominator += sum(w * math.exp(s / tau) for w, s in zip(weights, negative_sims))
    return -sum(s / tau for s in positive_sims) / len(positive_sims) + math.log(denominator)


def test_beta_zero_with_unique_ids_is_plain_info_nce():
    image, text = random_batch()
    loss = HardnessAwareContrastiveLoss(beta=0.0)(image, text, torch.arange(8), 0.07)
    torch.testing.assert_close(loss, plain_info_nce(image, text, 0.07), rtol=0, atol=1e-6)


def test_from_config_reads_beta_and_identity_positives():
    loss = HardnessAwareContrastiveLoss.from_config(LossConfig(beta=3.0, identity_positives=False))
    assert (loss.beta, loss.identity_positives) == (3.0, False)


@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_repeated_ids_match_the_hand_formula(beta):
    tau, s = 0.5, SIMILARITY  # ids 7, 7, 3: images and captions 0 and 1 show the same person
    image_to_text = [
        expected_anchor_loss([s[0][0], s[0][1]], [s[0][2]], tau, beta),
        expected_anchor_loss([s[1][0], s[1][1]], [s[1][2]], tau, beta),
        expected_anchor_loss([s[2][2]], [s[2][0], s[2][1]], tau, beta),
    ]
    text_to_image = [
        expected_anchor_loss([s[0][0], s[1][0]], [s[2][0]], tau, beta),
        expected_anchor_loss([s[0][1], s[1][1]], [s[2][1]], tau, beta),
        expected_anchor_loss([s[2][2]], [s[0][2], s[1][2]], tau, beta),
    ]
    expected = (sum(image_to_text) / 3 + sum(text_to_image) / 3) / 2

    image, text = embeddings_with_similarity(torch.tensor(SIMILARITY, dtype=torch.float64))
    loss = HardnessAwareContrastiveLoss(beta=beta)(image, text, torch.tensor([7, 7, 3]), tau)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def same_id_pair_gradient(identity_positives: bool) -> float:
    similarity = torch.tensor(SIMILARITY, requires_grad=True)
    image, text = embeddings_with_similarity(similarity)
    loss_fn = HardnessAwareContrastiveLoss(identity_positives=identity_positives)
    loss_fn(image, text, torch.tensor([7, 7, 3]), 0.5).backward()
    return similarity.grad[0, 1].item()


def test_without_identity_positives_a_same_id_pair_is_a_negative():
    image, text = embeddings_with_similarity(torch.tensor(SIMILARITY))
    loss = HardnessAwareContrastiveLoss(identity_positives=False)(image, text, torch.tensor([7, 7, 3]), 0.5)
    torch.testing.assert_close(loss, plain_info_nce(image, text, 0.5), rtol=0, atol=1e-6)
    # Gradient descent pushes the same-id similarity down as a negative, up as a positive.
    assert same_id_pair_gradient(identity_positives=False) > 0
    assert same_id_pair_gradient(identity_positives=True) < 0


def hard_to_easy_gradient_ratio(beta: float) -> float:
    # Anchor image 0: caption 1 is a hard negative (0.6), caption 2 an easy one (-0.3).
    similarity = torch.tensor([[0.8, 0.6, -0.3], [0.1, 0.8, 0.0], [0.0, 0.1, 0.8]], requires_grad=True)
    image, text = embeddings_with_similarity(similarity)
    HardnessAwareContrastiveLoss(beta=beta)(image, text, torch.arange(3), 0.5).backward()
    return (similarity.grad[0, 1].abs() / similarity.grad[0, 2].abs()).item()


def test_hard_negative_gradient_grows_with_beta():
    plain, weighted = hard_to_easy_gradient_ratio(0.0), hard_to_easy_gradient_ratio(5.0)
    assert plain > 1.0
    assert weighted > 3 * plain


def test_sgd_on_free_embeddings_lowers_the_loss():
    torch.manual_seed(0)
    raw_image = torch.randn(8, 16, requires_grad=True)
    raw_text = torch.randn(8, 16, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5])
    loss_fn = HardnessAwareContrastiveLoss(beta=2.0)
    optimizer = torch.optim.SGD([raw_image, raw_text], lr=0.5)
    losses = []
    for _ in range(20):
        loss = loss_fn(F.normalize(raw_image, dim=1), F.normalize(raw_text, dim=1), ids, 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_a_learnable_temperature_receives_gradient():
    image, text = random_batch()
    log_temperature = torch.tensor(math.log(0.07), requires_grad=True)
    HardnessAwareContrastiveLoss(beta=2.0)(image, text, torch.arange(8), log_temperature.exp()).backward()
    assert log_temperature.grad is not None
    assert torch.isfinite(log_temperature.grad) and log_temperature.grad != 0


def test_bf16_inputs_under_autocast_are_computed_in_float32():
    image, text = (emb.bfloat16() for emb in random_batch())
    loss_fn = HardnessAwareContrastiveLoss(beta=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(image, text, torch.arange(8), 0.05)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_fn(image.float(), text.float(), torch.arange(8), 0.05))


def mixup_targets(batch_size: int, seed: int = 0) -> torch.Tensor:
    """Row i: lambda_i on caption i, 1 - lambda_i on caption perm(i)."""
    generator = torch.Generator().manual_seed(seed)
    lambdas = 0.5 + 0.5 * torch.rand(batch_size, generator=generator)
    partner = torch.roll(torch.arange(batch_size), 1)
    targets = torch.diag(lambdas)
    targets[torch.arange(batch_size), partner] += 1 - lambdas
    return targets


def test_soft_targets_match_cross_entropy_with_probabilities():
    image, text = random_batch()
    targets = mixup_targets(8)
    logits = image @ text.T / 0.1
    text_targets = targets.T / targets.T.sum(dim=1, keepdim=True)
    expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, text_targets)) / 2
    loss = HardnessAwareContrastiveLoss(beta=0.0)(image, text, torch.arange(8), 0.1, targets=targets)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)


def test_targets_from_ids_reproduce_the_default():
    image, text = random_batch()
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 4])
    same_id = (ids[:, None] == ids[None, :]).float()
    loss_fn = HardnessAwareContrastiveLoss(beta=3.0)
    explicit = loss_fn(image, text, ids, 0.1, targets=same_id / same_id.sum(dim=1, keepdim=True))
    torch.testing.assert_close(explicit, loss_fn(image, text, ids, 0.1))


def test_targets_with_an_untargeted_caption_are_refused():
    image, text = random_batch(batch_size=3)
    targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="column"):
        HardnessAwareContrastiveLoss()(image, text, torch.arange(3), 0.1, targets=targets)


def test_a_batch_of_one_person_has_no_negatives_and_stays_finite():
    raw_image, raw_text = (emb.clone().requires_grad_() for emb in random_batch(batch_size=4))
    loss = HardnessAwareContrastiveLoss(beta=2.0)(raw_image, raw_text, torch.zeros(4, dtype=torch.long), 0.1)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(raw_image.grad).all() and torch.isfinite(raw_text.grad).all()


def test_similarity_stats_on_the_hand_example():
    image, text = embeddings_with_similarity(torch.tensor(SIMILARITY))
    stats = HardnessAwareContrastiveLoss().similarity_stats(image, text, torch.tensor([7, 7, 3]))
    assert stats["positive_similarity"] == pytest.approx((0.9 + 0.5 + 0.4 + 0.8 + 0.7) / 5)
    assert stats["hardest_negative_similarity"] == pytest.approx((0.1 + 0.2 + 0.6) / 3)


def test_gather_without_a_process_group_returns_the_tensor():
    tensor = torch.randn(4, 2)
    assert gather_with_grad(tensor) is tensor


# --- Two processes (gloo on CPU) against one process over the global batch.

GLOBAL_IDS = torch.tensor([0, 1, 2, 0, 3, 1, 4, 5])  # id 0 repeats within rank 0, id 1 across ranks
BETA = 2.0


def loss_and_gradients(use_targets: bool, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """Like a DDP step: every rank holds the same parameters and embeds its share of the batch."""
    raw_image, raw_text = (emb.clone().requires_grad_() for emb in random_batch(seed=1))
    log_temperature = torch.tensor(math.log(0.1), requires_grad=True)
    local = slice(rank * len(GLOBAL_IDS) // world_size, (rank + 1) * len(GLOBAL_IDS) // world_size)
    targets = mixup_targets(len(GLOBAL_IDS))[local] if use_targets else None
    loss = HardnessAwareContrastiveLoss(beta=BETA)(
        F.normalize(raw_image[local], dim=1),
        F.normalize(raw_text[local], dim=1),
        GLOBAL_IDS[local],
        log_temperature.exp(),
        targets=targets,
    )
    loss.backward()
    results = {
        "loss": loss.detach(),
        "image_grad": raw_image.grad,
        "text_grad": raw_text.grad,
        "temperature_grad": log_temperature.grad,
    }
    if world_size > 1:
        for value in results.values():  # what DDP does to gradients; the mean of the local losses
            dist.all_reduce(value)
            value /= world_size
    return results


def distributed_worker(rank: int, world_size: int, port: int, result_path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {targets: loss_and_gradients(targets, rank, world_size) for targets in (False, True)}
        if rank == 0:
            torch.save(results, result_path)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_over_the_global_batch(tmp_path):
    result_path = str(tmp_path / "distributed.pt")
    mp.spawn(distributed_worker, args=(2, free_port(), result_path), nprocs=2, join=True)
    distributed = torch.load(result_path)
    for use_targets in (False, True):
        single = loss_and_gradients(use_targets)
        for name, expected in single.items():
            actual = distributed[use_targets][name]
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5, msg=name)
