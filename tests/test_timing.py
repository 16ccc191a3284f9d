"""Timings go beside the metrics, not in them: `dvc metrics diff` between two machines shows quality."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.core.runtime import TIMING_KEYS, split_timing

REPO = Path(__file__).resolve().parents[1]


def test_split_timing_moves_durations_and_rates_at_any_depth():
    results = {"samples": 400, "samples_per_s": 6.4, "stage_seconds": 478.6, "estimated_hours_at_measured_rate": 0.02,
               "generator": {"vae_val_psnr_db": 26.3, "seconds": {"unet": 278.1, "vae": 158.8}},
               "probe": {"seconds": 16.9, "val_accuracy": {"upper": 93.0}}, "nested": {"only_seconds": 1.0}}
    metrics, timing = split_timing(results)
    assert metrics == {"samples": 400, "generator": {"vae_val_psnr_db": 26.3}, "probe": {"val_accuracy": {"upper": 93.0}},
                       "nested": {}}
    assert timing == {"samples_per_s": 6.4, "stage_seconds": 478.6, "estimated_hours_at_measured_rate": 0.02,
                      "generator": {"seconds": {"unet": 278.1, "vae": 158.8}}, "probe": {"seconds": 16.9},
                      "nested": {"only_seconds": 1.0}}


def _keys(value, prefix=""):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _keys(inner, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def test_no_committed_metrics_file_holds_a_timing():
    """Every metrics file dvc.yaml declares (as the last `dvc repro` wrote it) is free of timings."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    variants = yaml.safe_load((REPO / "params.yaml").read_text())["variants"]
    declared = []
    for stage in stages.values():
        body = stage.get("do", stage)
        for entry in body.get("metrics", []):
            name = next(iter(entry)) if isinstance(entry, dict) else entry
            declared += [name.replace("${key}", v) for v in variants] if "${key}" in name else [name]
    assert len(declared) >= 9
    for name in declared:
        keys = list(_keys(json.loads((REPO / name).read_text())))
        timed = [k for k in keys if k.rsplit(".", 1)[-1].endswith(TIMING_KEYS)]
        assert not timed, f"{name} holds timings {timed}: write them to the stage's timing file"
