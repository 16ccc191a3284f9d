"""DVC stage `filter`: score every generated pair in data/pdg/raw and keep the good ones.

The stage first calibrates the consistency thresholds on the scorer's behaviour on
`filter.calibration_pairs` real training pairs (pipeline/pdg/calibration.py). It then writes three outputs.
- data/pdg/filtered holds the kept pairs. Their json gains the scores.
- metrics/filter.json holds pairs in, kept, failures per reason, and acceptance rate. It also holds the
  quantiles of the consistency and fidelity scores over all pairs, and the calibration. The calibration
  is the real pairs' distributions and the thresholds they give.
- reports/filter/examples.png shows kept and rejected pairs with their scores.

The scorer is `filter.scorer`. It is a trained dual encoder of this project (models/baseline, the
default) or a CLIP folder. dvc.yaml makes it the stage's dependency.

Two diagnostics run outside the DAG.
- `python -m experiments.attribute_check` measures how often train_generator's attribute probe
  confirms the kept and the rejected edits (SynthPedes).
- benchmarks/bench_filter_truth.py measures how well the filter tells right edits from known-bad ones,
  against SynthPedes' ground truth.
"""

from __future__ import annotations

import logging
import sys

from pipeline.core.io import write_json_atomic, writing_directory
from pipeline.pdg.calibration import calibrate_on_prepared
from pipeline.pdg.filtering import filter_pairs, read_generated, referenced_sources, summarise, write_kept
from pipeline.pdg.scorers import NoSuchCheckpoint, load_scorer
from pipeline.pdg.shards import load_source_images, pdg_shards
from pipeline.plots import plot_filter_examples
from pipeline.core.devices import inference_device
from pipeline.core.runtime import start_stage


log = logging.getLogger("stages.filter")


def main() -> int:
    args, params = start_stage("filter", __doc__, paths=("prepared", "raw", "out", "metrics", "sheet"))
    cfg = params.filter
    shards = pdg_shards(args.raw)
    if not shards:
        log.error("no generated shards in %s: run `dvc repro generate` first", args.raw)
        return 1
    device = inference_device()
    try:
        scorer = load_scorer(cfg.scorer, device)
    except NoSuchCheckpoint as err:
        log.error("params: 'filter.scorer' %r: %s", cfg.scorer, err)
        return 1
    except (OSError, ValueError) as err:
        log.error("params: 'filter.scorer' %r could not be loaded as a CLIP model: %s", cfg.scorer, err)
        return 1
    try:
        calibration = calibrate_on_prepared(scorer, args.prepared, cfg)
    except ValueError as err:  # no training caption names a colour: nothing to calibrate on
        log.error("filter: cannot calibrate on the train split of %s: %s", args.prepared, err)
        return 1
    log.info("calibrated on %d real training pairs: margin >= %.5f (level %g), similarity >= %.5f (level %g)",
             calibration.preference.size, calibration.margin_threshold, cfg.margin_level,
             calibration.similarity_threshold, cfg.similarity_level)
    samples = read_generated(shards)
    sources = load_source_images(args.prepared, referenced_sources(samples))
    pairs = filter_pairs(samples, sources, scorer, cfg, calibration)
    with writing_directory(args.out) as staging:
        written = write_kept(pairs, staging, params.pdg.shard_size, cfg.enabled)
    report = summarise(pairs, cfg.enabled, calibration).to_json()
    write_json_atomic(args.metrics, report)
    plot_filter_examples(pairs, sources, args.sheet, cfg.sheet_samples)
    log.info("kept %d of %d pairs: %s", written, len(pairs), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
