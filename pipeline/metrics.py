"""Text-to-image retrieval metrics: Rank-K, mAP, mINP and the CMC curve.

The protocol: docs/design.md, section 3, "Evaluation protocol".

Each query ranks the whole gallery by similarity, descending. Ties are broken by
gallery index: among equal similarities the lower index ranks first, so results are
deterministic and do not depend on the sort algorithm or the device.

Every metric needs only the rank of each correct (same person id) gallery image, so
the ranking is never materialised. A query's correct images are few (about 3 of 3,074
on CUHK-PEDES), and a correct image's rank is one plus the number of gallery images
that beat it; counting those is a few vectorised comparisons per correct image, much
cheaper than sorting the gallery. Queries with many correct images fall back to a
stable sort. Work is chunked over queries, so the extra memory is bounded by the chunk
size, not by the number of queries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

# From benchmarks/bench_metrics.py (2-core CPU, 6,156 x 3,074): 64 to 256 queries per
# chunk tie on a quiet machine (buffers stay in cache); 256 means fewer parallel ops,
# which stall when other processes compete for the cores.
DEFAULT_CHUNK_SIZE = 256

# Counting costs one pass over the gallery per correct image; above this many correct
# images a stable sort of the gallery is cheaper (a sort costs about 30 such passes).
MAX_POSITIVES_FOR_COUNTING = 32


def retrieval_metrics(
    similarity: ArrayLike,
    query_pids: ArrayLike,
    gallery_pids: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """Rank-K, mAP and mINP of a query-by-gallery similarity matrix, as percentages.

    `similarity` is [Q, G], a torch tensor or numpy array. It is computed in float32 on its
    own device. `query_pids` (Q) and `gallery_pids` (G) are integer person ids. A gallery
    image is correct for a query if it has the query's person id. The gallery is ranked
    by similarity, descending, and ties go to the lower gallery index. `chunk_size` queries
    are ranked at once. The extra memory is about chunk_size * G * (4 + min(max N_q, 32)) bytes.

    Returns {"R{k}" for k in ks, "mAP", "mINP"}.
    - R{k} is the % of queries with at least one correct image in the top k.
    - mAP is the mean over queries of (1/N_q) * sum over ranks r holding a correct image of
      (correct images in the top r) / r. N_q is the query's number of correct images.
    - mINP is the mean over queries of N_q / (rank of the last correct image).

    Raises ValueError on mismatched shapes, NaN similarities, or queries whose person id
    has no image in the gallery. The protocol assumes every query has a match. The
    message says how many queries lack one.
    """
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of ranks >= 1, got {list(ks)}")
    hits_at_k = dict.fromkeys(ks, 0)
    ap_sum = inp_sum = 0.0
    num_queries = 0
    for ranks, num_positives in _positive_rank_chunks(similarity, query_pids, gallery_pids, chunk_size):
        first_rank = ranks[:, 0]
        for k in ks:
            hits_at_k[k] += int((first_rank <= k).sum())
        ap_sum += float(_average_precision(ranks, num_positives).sum())
        last_rank = ranks.gather(1, (num_positives - 1).unsqueeze(1)).squeeze(1)
        inp_sum += float((num_positives / last_rank).sum())
        num_queries += len(ranks)
    metrics = {f"R{k}": 100.0 * hits / num_queries for k, hits in hits_at_k.items()}
    metrics["mAP"] = 100.0 * ap_sum / num_queries
    metrics["mINP"] = 100.0 * inp_sum / num_queries
    return metrics


def cmc_curve(
    similarity: ArrayLike,
    query_pids: ArrayLike,
    gallery_pids: ArrayLike,
    max_rank: int = 50,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[float]:
    """Cumulative match characteristic: Rank-K in % for K = 1..max_rank.

    Same inputs, ranking, tie-breaking and errors as `retrieval_metrics`; element K-1
    equals its R{K}.
    """
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    first_rank_counts = torch.zeros(max_rank + 1, dtype=torch.int64)
    num_queries = 0
    for ranks, _ in _positive_rank_chunks(similarity, query_pids, gallery_pids, chunk_size):
        # Ranks past max_rank share the last bin, which the curve drops.
        first_rank = ranks[:, 0].clamp(max=max_rank + 1) - 1
        first_rank_counts += torch.bincount(first_rank, minlength=max_rank + 1).cpu()
        num_queries += len(ranks)
    cumulative = first_rank_counts[:max_rank].cumsum(0)
    return [100.0 * int(hits) / num_queries for hits in cumulative]


def _average_precision(ranks: torch.Tensor, num_positives: torch.Tensor) -> torch.Tensor:
    """AP per query from its correct images' ranks (ascending, padding past N_q)."""
    positions = torch.arange(1, ranks.shape[1] + 1, device=ranks.device)
    is_real = positions <= num_positives.unsqueeze(1)
    precision = torch.where(is_real, positions / ranks, 0.0)
    return precision.sum(1) / num_positives


def _positive_rank_chunks(
    similarity: ArrayLike, query_pids: ArrayLike, gallery_pids: ArrayLike, chunk_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The ranking shared by every metric, one chunk of queries at a time.

    Yields (ranks [C, P], num_positives [C]): row q holds the 1-based ranks of its
    N_q correct images, ascending, then padding of G + 1 up to P (the chunk's
    largest N_q). Every query appears in exactly one chunk, in no particular order.
    """
    similarity, query_pids, gallery_pids = _validated(similarity, query_pids, gallery_pids, chunk_size)
    num_gallery = similarity.shape[1]
    # A sum is NaN if any element is (or if +inf meets -inf): one cheap pass, then the exact check.
    if torch.isnan(similarity.sum()) and torch.isnan(similarity).any():
        raise ValueError("similarity contains NaN")
    gallery_order, first_slot, num_positives = _positives_by_query(query_pids, gallery_pids)
    # Chunks of queries with similar N_q waste little work on padding.
    query_order = torch.argsort(num_positives, stable=True)
    for start in range(0, len(query_order), chunk_size):
        queries = query_order[start : start + chunk_size]
        scores = similarity.index_select(0, queries).float()
        chunk_positives = num_positives[queries]
        width = int(chunk_positives.max())
        slots = torch.arange(width, device=scores.device)
        is_real = slots < chunk_positives.unsqueeze(1)
        # Padding slots repeat the first correct image; their ranks are overwritten below.
        slots = torch.where(is_real, slots, 0) + first_slot[queries].unsqueeze(1)
        positive_index = gallery_order[slots]
        if width <= MAX_POSITIVES_FOR_COUNTING:
            ranks = _ranks_by_counting(scores, positive_index)
        else:
            ranks = _ranks_by_sorting(scores, positive_index)
        ranks = torch.where(is_real, ranks, num_gallery + 1).sort(1).values
        yield ranks, chunk_positives


def _ranks_by_counting(scores: torch.Tensor, positive_index: torch.Tensor) -> torch.Tensor:
    """Rank of each listed image = 1 + number of images that beat it ([C, G] -> [C, P])."""
    candidate = scores.unsqueeze(1)
    target = scores.gather(1, positive_index).unsqueeze(2)
    num_higher = (candidate > target).sum(2, dtype=torch.int32)
    num_tied = (candidate >= target).sum(2, dtype=torch.int32) - num_higher  # the image itself included
    ranks = 1 + num_higher.long()
    # Real-valued scores rarely tie, so the index tie-break runs only on images that do.
    query_row, slot = torch.nonzero(num_tied > 1, as_tuple=True)
    if len(query_row):
        tied_index = positive_index[query_row, slot].unsqueeze(1)
        rows = scores[query_row]
        gallery_index = torch.arange(scores.shape[1], device=scores.device)
        tied_before = (rows == target[query_row, slot]) & (gallery_index < tied_index)
        ranks[query_row, slot] += tied_before.sum(1)
    return ranks


def _ranks_by_sorting(scores: torch.Tensor, positive_index: torch.Tensor) -> torch.Tensor:
    """Same ranks as `_ranks_by_counting`, via a stable descending sort of each row."""
    # + 0.0 turns -0.0 into 0.0, so a sort on bit patterns (radix, on GPUs) cannot split equal values.
    ranking = torch.sort(scores + 0.0, dim=1, descending=True, stable=True).indices
    rank_values = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(ranking)
    rank_of_image = torch.empty_like(ranking).scatter_(1, ranking, rank_values)
    return rank_of_image.gather(1, positive_index)


def _positives_by_query(
    query_pids: torch.Tensor, gallery_pids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each query's correct images sit in the gallery, grouped by person id.

    Returns (gallery_order, first_slot, num_positives): query q's correct images are
    gallery_order[first_slot[q] : first_slot[q] + num_positives[q]], ascending.
    """
    gallery_order = torch.argsort(gallery_pids, stable=True)
    unique_pids, counts = torch.unique_consecutive(gallery_pids[gallery_order], return_counts=True)
    group = torch.searchsorted(unique_pids, query_pids).clamp(max=len(unique_pids) - 1)
    has_match = unique_pids[group] == query_pids
    num_unmatched = int((~has_match).sum())
    if num_unmatched:
        raise ValueError(
            f"{num_unmatched} of {len(query_pids)} queries have no gallery image with their person id; "
            "the evaluation protocol requires at least one"
        )
    group_start = counts.cumsum(0) - counts
    return gallery_order, group_start[group], counts[group]


def _validated(
    similarity: ArrayLike, query_pids: ArrayLike, gallery_pids: ArrayLike, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensors on the similarity's device, after checking shapes and dtypes."""
    similarity = torch.as_tensor(similarity)
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be 2-D [queries, gallery], got shape {tuple(similarity.shape)}")
    num_queries, num_gallery = similarity.shape
    if num_queries == 0 or num_gallery == 0:
        raise ValueError(f"similarity must have queries and gallery images, got shape {tuple(similarity.shape)}")
    pids = []
    for name, values, expected in (("query_pids", query_pids, num_queries), ("gallery_pids", gallery_pids, num_gallery)):
        values = torch.as_tensor(values, device=similarity.device)
        if values.ndim != 1 or values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer array, got {values.dtype} of shape {tuple(values.shape)}")
        if len(values) != expected:
            raise ValueError(
                f"similarity is {num_queries} x {num_gallery} but {name} has {len(values)} entries (expected {expected})"
            )
        pids.append(values.long())
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return similarity, pids[0], pids[1]
