"""DVC stage `filter`: score every generated pair in data/pdg/raw and keep the good ones.

Writes the kept pairs to data/pdg/filtered (their json gains the scores), metrics/filter.json
(pairs in, kept, failures per reason, acceptance rate, and the quantiles of the consistency and
fidelity scores over all pairs, to calibrate the thresholds on) and reports/filter/examples.png
(kept and rejected pairs with their scores). The scorer is `filter.scorer`: a trained dual encoder of this
project (models/baseline, the default) or a CLIP folder; dvc.yaml makes it the stage's dependency. Where train_generator left an attribute probe (models/probe: SynthPedes colour
labels), the report also says how often it confirms the kept and the rejected edits, and
`filter.attribute_probe` makes its verdict a criterion.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

from pipeline.data.canonical import manifest_path, read_manifest
from pipeline.io import write_json_atomic
from pipeline.pdg.filtering import AttributeChecker, filter_pairs, read_generated, referenced_sources, summarise, write_kept
from pipeline.pdg.scorers import NoSuchCheckpoint, dual_encoder_folder, load_scorer
from pipeline.pdg.generate import load_source_images, pdg_shards
from pipeline.generator.probe import CONFIG_FILE, AttributeProbe
from pipeline.plots import plot_filter_examples
from pipeline.runtime import inference_device, start_stage

PREPARED = Path("data/prepared")
RAW = Path("data/pdg/raw")
OUT_DIR = Path("data/pdg/filtered")
PROBE = Path("models/probe")
METRICS = Path("metrics/filter.json")
SHEET = Path("reports/filter/examples.png")

log = logging.getLogger("stages.filter")


def main() -> int:
    _, params = start_stage(__doc__)
    cfg = params.filter
    shards = pdg_shards(RAW)
    if not shards:
        log.error("no generated shards in %s: run `dvc repro generate` first", RAW)
        return 1
    if cfg.scorer.startswith("models/") and dual_encoder_folder(cfg.scorer) is None:
        log.error("params: 'filter.scorer' %s holds no trained dual encoder: run `dvc repro train@%s`", cfg.scorer,
                  Path(cfg.scorer).name)
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
    checker = attribute_checker()
    if cfg.attribute_probe != "off" and checker is None:
        log.error("filter.attribute_probe is %s, but %s holds no probe, or the train split no colour labels: "
                  "run `dvc repro train_generator` on SynthPedes", cfg.attribute_probe, PROBE)
        return 1
    samples = read_generated(shards)
    sources = load_source_images(PREPARED, referenced_sources(samples))
    pairs = filter_pairs(samples, sources, scorer, cfg, checker=checker)
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    written = write_kept(pairs, OUT_DIR, params.pdg.shard_size, cfg.enabled)
    report = summarise(pairs, cfg.enabled, attribute_checked=checker is not None).to_json()
    write_json_atomic(METRICS, report)
    plot_filter_examples(pairs, sources, SHEET, cfg.sheet_samples)
    log.info("kept %d of %d pairs: %s", written, len(pairs), report)
    return 0


def attribute_checker() -> AttributeChecker | None:
    """The probe with the training sources' colour labels; None where either is missing."""
    if not (PROBE / CONFIG_FILE).is_file():
        return None
    rows = read_manifest(manifest_path(PREPARED, "train"))
    attributes = {row.key: json.loads(row.attributes) for row in rows if row.attributes}
    if not any(a.get("upper_color") for a in attributes.values()):
        return None
    log.info("attribute probe %s: checking the edits of %d labelled sources", PROBE, len(attributes))
    return AttributeChecker(AttributeProbe.load(PROBE), attributes)


if __name__ == "__main__":
    sys.exit(main())
