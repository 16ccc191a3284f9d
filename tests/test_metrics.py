"""Retrieval metrics: hand-computed cases, agreement with a plain per-query loop, errors."""

import numpy as np
import pytest
import torch

from pipeline import metrics
from pipeline.metrics import cmc_curve, retrieval_metrics


@pytest.fixture(params=["counting", "sorting"], autouse=True)
def ranking_path(request, monkeypatch):
    """Run every test through both ways of ranking the correct images."""
    if request.param == "sorting":
        monkeypatch.setattr(metrics, "MAX_POSITIVES_FOR_COUNTING", 0)
    return request.param


def assert_metrics(actual, expected):
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, abs=1e-4), name


# --- hand-computed cases ---------------------------------------------------------------


def test_several_positives():
    # Gallery pids    7    1    7    2     7    3     query pid 7
    # similarity     0.9  0.8  0.3  0.95  0.1  0.5
    # Ranking: g3 (pid 2), g0 (7), g1, g5, g2 (7), g4 (7) -> correct at ranks 2, 5, 6.
    # R1 = 0, R5 = R10 = 100; AP = (1/2 + 2/5 + 3/6) / 3 = 1.4 / 3; mINP = 3 / 6.
    similarity = [[0.9, 0.8, 0.3, 0.95, 0.1, 0.5]]
    result = retrieval_metrics(np.array(similarity), np.array([7]), np.array([7, 1, 7, 2, 7, 3]))
    assert_metrics(result, {"R1": 0.0, "R5": 100.0, "R10": 100.0, "mAP": 100 * 1.4 / 3, "mINP": 50.0})


def test_ties_go_to_the_lower_gallery_index():
    # All four images score 0.5; ranking is g0, g1, g2, g3 by index.
    # Query pid 2 (images g1, g2): ranks 2, 3 -> R1 = 0, AP = (1/2 + 2/3) / 2, INP = 2/3.
    similarity = torch.full((1, 4), 0.5)
    result = retrieval_metrics(similarity, torch.tensor([2]), torch.tensor([1, 2, 2, 1]), ks=(1, 2))
    assert_metrics(result, {"R1": 0.0, "R2": 100.0, "mAP": 100 * (1 / 2 + 2 / 3) / 2, "mINP": 100 * 2 / 3})


def test_tie_break_decides_rank_1():
    # Two images tie at 0.5; only their order in the gallery differs.
    # Positive at g1 -> ranked 2nd, R1 = 0, AP = INP = 1/2; positive at g0 -> 1st, all 100.
    similarity = torch.tensor([[0.5, 0.5]])
    positive_second = retrieval_metrics(similarity, [1], [2, 1], ks=(1,))
    positive_first = retrieval_metrics(similarity, [1], [1, 2], ks=(1,))
    assert_metrics(positive_second, {"R1": 0.0, "mAP": 50.0, "mINP": 50.0})
    assert_metrics(positive_first, {"R1": 100.0, "mAP": 100.0, "mINP": 100.0})


def test_only_positive_ranked_last():
    # G = 12; the one correct image (g0) has the lowest similarity -> rank 12.
    # R1 = R5 = R10 = 0, AP = 1/12, mINP = 1/12.
    similarity = torch.linspace(-1.0, 1.0, 12).unsqueeze(0)
    result = retrieval_metrics(similarity, [5], [5] + list(range(100, 111)))
    assert_metrics(result, {"R1": 0.0, "R5": 0.0, "R10": 0.0, "mAP": 100 / 12, "mINP": 100 / 12})
    assert cmc_curve(similarity, [5], [5] + list(range(100, 111)), max_rank=13) == [0.0] * 11 + [100.0, 100.0]


def test_perfect_ranking_scores_100():
    # Each query's two correct images score highest.
    gallery_pids = torch.tensor([0, 0, 1, 1, 2, 2])
    query_pids = torch.tensor([0, 1, 2, 1])
    similarity = (query_pids[:, None] == gallery_pids[None, :]).float() + 0.01 * torch.rand(4, 6)
    result = retrieval_metrics(similarity, query_pids, gallery_pids)
    assert_metrics(result, dict.fromkeys(["R1", "R5", "R10", "mAP", "mINP"], 100.0))


def test_metrics_average_over_queries():
    # Query 0 as in test_several_positives (AP 1.4/3, INP 1/2, first hit at rank 2);
    # query 1 (pid 3, image g5 at 0.9, ranked 1st): AP = INP = 1.
    similarity = [[0.9, 0.8, 0.3, 0.95, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5, 0.9]]
    query_pids, gallery_pids = [7, 3], [7, 1, 7, 2, 7, 3]
    result = retrieval_metrics(similarity, query_pids, gallery_pids, ks=(1, 2))
    assert_metrics(result, {"R1": 50.0, "R2": 100.0, "mAP": 50 * (1.4 / 3 + 1), "mINP": 50 * (0.5 + 1)})
    assert cmc_curve(similarity, query_pids, gallery_pids, max_rank=3) == [50.0, 100.0, 100.0]


def test_infinite_scores_rank_like_any_other():
    # +inf and -inf together sum to NaN; that must not be mistaken for a NaN score.
    # Ranking: g0 (+inf), g2 (0.5), g1 (-inf, the positive) -> rank 3, AP = INP = 1/3.
    similarity = torch.tensor([[float("inf"), float("-inf"), 0.5]])
    result = retrieval_metrics(similarity, [4], [0, 4, 1], ks=(1, 3))
    assert_metrics(result, {"R1": 0.0, "R3": 100.0, "mAP": 100 / 3, "mINP": 100 / 3})


def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(0)
    similarity = rng.standard_normal((20, 30)).astype(np.float32)
    gallery_pids = rng.integers(0, 8, 30)
    query_pids = rng.choice(gallery_pids, 20).astype(np.int32)
    from_numpy = retrieval_metrics(similarity, query_pids, gallery_pids)
    from_torch = retrieval_metrics(torch.from_numpy(similarity), torch.from_numpy(query_pids), torch.from_numpy(gallery_pids))
    assert from_numpy == from_torch


def test_chunk_size_does_not_change_results():
    generator = torch.Generator().manual_seed(1)
    similarity = torch.randint(0, 5, (40, 25), generator=generator).float()  # many ties
    gallery_pids = torch.randint(0, 6, (25,), generator=generator)
    query_pids = gallery_pids[torch.randint(0, 25, (40,), generator=generator)]
    one_at_a_time = retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=1)
    all_at_once = retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=1000)
    assert_metrics(one_at_a_time, all_at_once)
    assert cmc_curve(similarity, query_pids, gallery_pids, chunk_size=1) == cmc_curve(
        similarity, query_pids, gallery_pids, chunk_size=1000
    )


# --- agreement with a plain per-query implementation ----------------------------------


def reference_metrics(similarity, query_pids, gallery_pids, ks, max_rank):
    """The protocol written out literally, one query at a time."""
    num_gallery = len(gallery_pids)
    hits, average_precisions, inverse_penalties = dict.fromkeys(ks, 0), [], []
    first_ranks = []
    for scores, pid in zip(similarity, query_pids):
        ranking = sorted(range(num_gallery), key=lambda j: (-scores[j], j))
        correct_ranks = [rank for rank, j in enumerate(ranking, start=1) if gallery_pids[j] == pid]
        for k in ks:
            hits[k] += correct_ranks[0] <= k
        precisions = [found / rank for found, rank in enumerate(correct_ranks, start=1)]
        average_precisions.append(sum(precisions) / len(correct_ranks))
        inverse_penalties.append(len(correct_ranks) / correct_ranks[-1])
        first_ranks.append(correct_ranks[0])
    num_queries = len(query_pids)
    result = {f"R{k}": 100 * hits[k] / num_queries for k in ks}
    result["mAP"] = 100 * sum(average_precisions) / num_queries
    result["mINP"] = 100 * sum(inverse_penalties) / num_queries
    curve = [100 * sum(rank <= k for rank in first_ranks) / num_queries for k in range(1, max_rank + 1)]
    return result, curve


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("num_queries", "num_gallery", "num_ids"), [(1, 1, 1), (7, 5, 2), (50, 40, 6), (90, 120, 25)])
def test_agrees_with_plain_loop(seed, num_queries, num_gallery, num_ids):
    rng = np.random.default_rng(seed)
    # Rounding to one decimal makes ties common, -0.0 included; few ids give several positives.
    similarity = np.round(rng.uniform(-1, 1, (num_queries, num_gallery)), 1)
    gallery_pids = rng.integers(0, num_ids, num_gallery)
    query_pids = rng.choice(gallery_pids, num_queries)
    ks = (1, 3, 10)
    expected, expected_curve = reference_metrics(similarity.tolist(), query_pids.tolist(), gallery_pids.tolist(), ks, 15)
    chunk_size = int(rng.integers(1, num_queries + 1))
    assert_metrics(retrieval_metrics(similarity, query_pids, gallery_pids, ks=ks, chunk_size=chunk_size), expected)
    curve = cmc_curve(similarity, query_pids, gallery_pids, max_rank=15, chunk_size=chunk_size)
    assert curve == pytest.approx(expected_curve, abs=1e-4)


# --- errors ------------------------------------------------------------------------------


def test_query_without_positive_is_an_error():
    similarity = torch.rand(3, 4)
    with pytest.raises(ValueError, match="2 of 3 queries have no gallery image"):
        retrieval_metrics(similarity, [1, 8, 9], [1, 1, 2, 3])
    with pytest.raises(ValueError, match="1 of 3 queries"):
        cmc_curve(similarity, [1, 2, 9], [1, 1, 2, 3])


@pytest.mark.parametrize(
    ("shape", "num_query_pids", "num_gallery_pids", "message"),
    [
        ((3, 4), 2, 4, "similarity is 3 x 4 but query_pids has 2 entries"),
        ((3, 4), 3, 5, "similarity is 3 x 4 but gallery_pids has 5 entries"),
        ((12,), 3, 4, "must be 2-D"),
        ((0, 4), 0, 4, "must have queries and gallery images"),
    ],
)
def test_shape_mismatch_is_an_error(shape, num_query_pids, num_gallery_pids, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(torch.rand(shape), torch.zeros(num_query_pids, dtype=torch.long), torch.zeros(num_gallery_pids, dtype=torch.long))


def test_bad_values_are_errors():
    similarity = torch.rand(2, 3)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[0.1, float("nan"), 0.3], [0.1, 0.2, 0.3]]), [0, 0], [0, 1, 2])
    with pytest.raises(ValueError, match="query_pids must be a 1-D integer array"):
        retrieval_metrics(similarity, [0.0, 1.0], [0, 1, 2])
    with pytest.raises(ValueError, match="ks must be"):
        retrieval_metrics(similarity, [0, 1], [0, 1, 2], ks=(0, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(similarity, [0, 1], [0, 1, 2], chunk_size=0)
    with pytest.raises(ValueError, match="max_rank"):
        cmc_curve(similarity, [0, 1], [0, 1, 2], max_rank=0)
