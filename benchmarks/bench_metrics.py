"""Cost of the retrieval metrics next to the similarity product they evaluate.

A CUHK-PEDES-sized test split: 6,156 caption queries x 3,074 gallery images, 512-d
L2-normalised float32 embeddings, 1,000 identities. Times, in one process after a
warm-up (median of the repeats):
  (a) the bare product text_emb @ image_emb.T;
  (b) the same product followed by `retrieval_metrics`.
Goal: (b) at most 2x (a). Also times the metrics alone for several chunk sizes (how the
default was chosen). Writes benchmarks/results/metrics.json.

    python benchmarks/bench_metrics.py [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.metrics import DEFAULT_CHUNK_SIZE, retrieval_metrics  # noqa: E402

NUM_QUERIES, NUM_GALLERY, DIM, NUM_IDS = 6156, 3074, 512, 1000
CHUNK_SIZES = (32, 64, 128, 256, 512)
NOISE = 2.5  # per-dimension noise around unit-variance identity prototypes: R1 near 67%, like CUHK-PEDES models
RESULTS = REPO / "benchmarks" / "results" / "metrics.json"


def make_split(seed: int = 0, noise: float = NOISE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings clustered by identity, so the metrics land in a realistic range."""
    generator = torch.Generator().manual_seed(seed)
    # Every identity has 3 images; 74 random identities have a 4th (3,074 in all).
    extra = torch.randperm(NUM_IDS, generator=generator)[: NUM_GALLERY - 3 * NUM_IDS]
    gallery_pids = torch.cat([torch.arange(NUM_IDS).repeat(3), extra])
    query_pids = gallery_pids[torch.randint(NUM_GALLERY, (NUM_QUERIES,), generator=generator)]
    prototypes = torch.randn(NUM_IDS, DIM, generator=generator)

    def embed(pids: torch.Tensor) -> torch.Tensor:
        noisy = prototypes[pids] + noise * torch.randn(len(pids), DIM, generator=generator)
        return torch.nn.functional.normalize(noisy, dim=1)

    return embed(query_pids), embed(gallery_pids), query_pids, gallery_pids


def median_ms(functions: dict[object, Callable[[], object]], repeats: int) -> dict[object, float]:
    """Median wall time of each function; repeats interleave them, so load spikes hit all alike."""
    for function in functions.values():
        function()  # warm-up: allocator, thread pool, caches
    times: dict[object, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = round(os.getloadavg()[0], 2)
    text_emb, image_emb, query_pids, gallery_pids = make_split()
    similarity = text_emb @ image_emb.T
    metrics = retrieval_metrics(similarity, query_pids, gallery_pids)

    timed = median_ms(
        {
            "product": lambda: text_emb @ image_emb.T,
            "evaluation": lambda: retrieval_metrics(text_emb @ image_emb.T, query_pids, gallery_pids),
        },
        args.repeats,
    )
    product_ms, evaluation_ms = timed["product"], timed["evaluation"]
    metrics_only_ms = median_ms(
        {size: partial(retrieval_metrics, similarity, query_pids, gallery_pids, chunk_size=size) for size in CHUNK_SIZES},
        args.repeats,
    )
    ratio = evaluation_ms / product_ms

    results = {
        "shapes": {"queries": NUM_QUERIES, "gallery": NUM_GALLERY, "dim": DIM, "identities": NUM_IDS},
        "product_ms": round(product_ms, 2),
        "product_plus_metrics_ms": round(evaluation_ms, 2),
        "ratio": round(ratio, 3),
        "goal_ratio": 2.0,
        "default_chunk_size": DEFAULT_CHUNK_SIZE,
        "metrics_only_ms_by_chunk_size": {str(size): round(ms, 2) for size, ms in metrics_only_ms.items()},
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        # Other processes competing for the cores inflate the many small ops of the metrics
        # far more than the single large product; judge the ratio with this figure.
        "load_average_1min_before_after": [load_before, round(os.getloadavg()[0], 2)],
        "torch": torch.__version__,
        "device": "cpu",
        "processor": platform.processor() or platform.machine(),
        "date": datetime.date.today().isoformat(),
        "metrics_of_synthetic_split": {name: round(value, 2) for name, value in metrics.items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")

    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print("metrics alone by chunk size (ms): " + ", ".join(f"{s}: {ms:.1f}" for s, ms in metrics_only_ms.items()))
    print(
        f"product {product_ms:.1f} ms | product + metrics {evaluation_ms:.1f} ms | "
        f"ratio {ratio:.2f} (goal <= 2.0) | {torch.get_num_threads()} threads, "
        f"load {load_before:.1f} | written to {RESULTS.relative_to(REPO)}"
    )


if __name__ == "__main__":
    main()
