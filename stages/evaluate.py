"""DVC stage `evaluate@<variant>`: test-split retrieval of the best-on-val checkpoint, and its sensitivity.

The sensitivity is colour-edit sensitivity. It asks whether the true caption beats a colour-edited one
for its own image."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from pipeline.evaluation import colour_sensitivity, embed_retrieval_split, load_retrieval_split, retrieval_scores
from pipeline.core.io import write_json_atomic
from pipeline.metrics import cmc_curve
from pipeline.models import DualEncoder, trained_model
from pipeline.plots import plot_cmc, plot_retrievals
from pipeline.run_folder import model_epoch
from pipeline.core.devices import inference_device
from pipeline.core.runtime import machine, start_stage

EXAMPLE_QUERIES = 6
EXAMPLE_TOP_K = 10

log = logging.getLogger("stages.evaluate")


def _retrieval_examples(data, similarity: torch.Tensor, path: Path, title: str) -> None:
    """Evenly spaced queries (not cherry-picked), each with its top-10 gallery images."""
    picks = torch.linspace(0, len(data.captions) - 1, EXAMPLE_QUERIES).long().tolist()
    ranked, correct = [], []
    for q in picks:
        # stable descending sort: ties go to the lower gallery index, as in the metrics
        order = torch.sort(similarity[q], descending=True, stable=True).indices[:EXAMPLE_TOP_K].tolist()
        ranked.append([data.image_bytes[g] for g in order])
        correct.append([bool(data.image_pids[g] == data.caption_pids[q]) for g in order])
    plot_retrievals([data.captions[q] for q in picks], ranked, correct, path, title)


def main() -> int:
    args, params = start_stage("evaluate", __doc__, with_variant=True, paths=("model", "prepared", "metrics", "reports"))
    checkpoint = trained_model(args.model)  # none: one line naming the stage to run
    epoch = model_epoch(checkpoint)
    device = inference_device()
    model = DualEncoder.from_pretrained(checkpoint, device=device).to(device)
    data = load_retrieval_split(args.prepared, "test")
    log.info("evaluating %s (epoch %s): %d queries, %d gallery images", checkpoint, epoch, len(data.captions), len(data.image_keys))
    text_emb, image_emb = embed_retrieval_split(model, data, params.train.eval_batch_size, device)
    metrics, similarity = retrieval_scores(data, text_emb, image_emb)
    sensitivity = colour_sensitivity(model, data, text_emb, image_emb, params.train.eval_batch_size, device)
    result = {
        **{k: round(v, 4) for k, v in metrics.items()},
        "num_queries": len(data.captions),
        "num_gallery": len(data.image_keys),
        "checkpoint_epoch": epoch,
        "colour_sensitivity": sensitivity,
        # CPU results differ between kernel families (same code, same seed): say where these came from
        "machine": machine(),
    }
    write_json_atomic(args.metrics, result)
    reports = args.reports
    cmc = cmc_curve(similarity, data.caption_pids, data.image_pids, max_rank=min(50, len(data.image_keys)))
    plot_cmc(cmc, reports / "cmc.png", f"CMC, {args.variant} (test)")
    _retrieval_examples(data, similarity, reports / "retrievals.png", f"{args.variant}: top-{EXAMPLE_TOP_K} (green = same person)")
    log.info("test: %s", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
