"""The whole DAG on the tiny profile through real DVC: `dvc repro`, `dvc exp run -S pdg.num_samples=2`,
`dvc metrics diff`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.ablation import experiments
from pipeline.data.canonical import manifest_path, read_manifest
from tiny_project import (TINY_GENERATOR_PARAMS, TINY_TRAINING, assert_calibrated, deep_merge, dvc, make_tiny_project,
                          stale_stages)

pytestmark = pytest.mark.slow  # real `dvc repro` of the whole tiny DAG

TINY_DAG = deep_merge(TINY_TRAINING, {
    "generator": {**TINY_GENERATOR_PARAMS, "vae_steps": 4, "unet_steps": 4, "sample_steps": 2, "latent_channels": 4},
    "pdg": {"source_count": 4, "num_samples": 1, "num_steps": 3, "batch_size": 2, "shard_size": 2, "sheet_samples": 2},
    # a barely trained generator makes poor edits: the filter scores them (and calibrates) but keeps
    # every pair, so pairs flow on
    "filter": {"enabled": False, "calibration_pairs": 10, "sheet_samples": 2},
    "variants": {"pdg": {"online": {"embedding_neighbours": False, "mixup_layer": 0, "mixup_prob": 0.5}}},
})


def _git(project, *args):
    subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dag")
    make_tiny_project(folder, TINY_DAG, git=True)
    dvc(folder, "repro")
    return folder


def test_repro_runs_every_stage_and_both_variants(project):
    for name in ("baseline", "pdg", "filter", "generate", "caption", "generator"):
        assert (project / "metrics" / f"{name}.json").is_file(), name
    baseline = json.loads((project / "metrics" / "baseline.json").read_text())
    pdg = json.loads((project / "metrics" / "pdg.json").read_text())
    assert baseline["num_queries"] == pdg["num_queries"] > 0
    generated = json.loads((project / "metrics" / "generate.json").read_text())
    filtered = json.loads((project / "metrics" / "filter.json").read_text())
    assert filtered["pairs_in"] == generated["samples"] and filtered["kept"] >= 1
    assert "attribute_check" not in filtered  # a diagnostic outside the DAG (experiments/attribute_check.py)
    assert_calibrated(filtered["calibration"], most_pairs=10)
    captioned = json.loads((project / "metrics" / "caption.json").read_text())
    assert captioned["proximity_images"] == filtered["kept"]
    rows = read_manifest(manifest_path(project / "data" / "pdg" / "train", "train"))
    original = read_manifest(manifest_path(project / "data" / "prepared", "train"))
    assert len(rows) == len(original) + filtered["kept"]
    train_pdg = json.loads((project / "metrics" / "train_pdg.json").read_text())
    train_baseline = json.loads((project / "metrics" / "train_baseline.json").read_text())
    assert train_pdg["steps"] >= train_baseline["steps"]  # more pairs, at least as many steps
    for png in ("reports/filter/examples.png", "reports/pdg/sample_sheet.png", "reports/evaluate/pdg/cmc.png"):
        assert (project / png).stat().st_size > 3000, png
    assert stale_stages(project) == {}


def test_a_second_repro_runs_nothing_and_an_edit_to_an_imported_file_reruns_its_stage(project):
    again = dvc(project, "repro").stdout
    ran = [line for line in again.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'externals':"], again  # the digests of external inputs, rewritten identically
    assert stale_stages(project) == {}
    # one imported file per stage (not its entry point, and another one for each stage where it can)
    import yaml

    from pipeline.imports import import_closure

    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    names = [f"{name}@{key}" if "foreach" in body else name
             for name, body in stages.items() for key in (body.get("foreach") and ["baseline", "pdg"] or [None])]
    chosen: dict[str, Path] = {}
    for name in names:
        module = "stages." + name.split("@")[0]
        files = sorted(p.as_posix() for p in import_closure(module, project))
        files = [f for f in files if f.startswith("pipeline/") and f != "pipeline/__init__.py"]
        unused = [f for f in files if f not in chosen.values()]
        chosen[name] = (unused or files)[-1]
    for name, relative in chosen.items():
        path = project / relative
        text = path.read_text()
        path.write_text(text + "\n# an edit\n")
        try:
            status = stale_stages(project)
        finally:
            path.write_text(text)
        assert name in status, (name, relative, status)
    assert stale_stages(project) == {}


def test_exp_run_with_more_samples_regenerates_and_metrics_diff_shows_it(project):
    _git(project, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    _git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny run")
    before = json.loads((project / "metrics" / "generate.json").read_text())["samples"]
    baseline_weights = project / "models" / "baseline" / "best" / "model.safetensors"
    baseline_time = baseline_weights.stat().st_mtime_ns
    images_before = json.loads((project / "metrics" / "caption.json").read_text())["proximity_images"]
    run = dvc(project, "exp", "run", "-S", "pdg.num_samples=2")
    output = run.stdout + run.stderr
    assert "Stage 'train@baseline' didn't change" in output  # the baseline does not depend on pdg.*
    assert baseline_weights.stat().st_mtime_ns == baseline_time
    assert json.loads((project / "metrics" / "caption.json").read_text())["proximity_images"] > images_before
    after = json.loads((project / "metrics" / "generate.json").read_text())["samples"]
    assert after > before
    diff = dvc(project, "metrics", "diff").stdout
    assert "metrics/generate.json" in diff and "samples" in diff


def test_a_generator_pool_retrains_the_generator_but_not_the_baseline(project):
    baseline_weights = project / "models" / "baseline" / "best" / "model.safetensors"
    baseline_time = baseline_weights.stat().st_mtime_ns
    run = dvc(project, "exp", "run", "-S", "synth.num_generator_ids=3")
    output = run.stdout + run.stderr
    # prepare reruns (a synth param changed) and writes the same data/prepared: the pool is not in it
    assert "Stage 'train@baseline' didn't change" in output and baseline_weights.stat().st_mtime_ns == baseline_time
    generator = json.loads((project / "metrics" / "generator.json").read_text())["generator"]
    assert (generator["pool_images"], generator["train_images"]) == (3 * 2, 16 * 2)
    diff = dvc(project, "metrics", "diff").stdout
    assert "metrics/generator.json" in diff and "pool_images" in diff


def test_the_ablation_queues_dvc_experiments_and_reports_them_from_exp_show(project):
    """`experiments.ablation queue` -> `dvc exp run --run-all` -> `dvc exp show --json` -> the table."""
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "before the queue"],
                   cwd=project, capture_output=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}

    def ablation(*args):
        result = subprocess.run([sys.executable, "-m", "experiments.ablation", *args], cwd=project, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    queued = ablation("queue", "--rows", "pdg", "baseline-pdg-steps", "--seeds", "1")
    pdg_steps = json.loads((project / "metrics" / "train_pdg.json").read_text())["steps"]
    baseline_epoch_steps = json.loads((project / "metrics" / "train_baseline.json").read_text())["steps"] // 2
    matched_epochs = round(pdg_steps / baseline_epoch_steps)  # TINY_TRAINING trains 2 epochs
    assert f"--set-param train.epochs={matched_epochs}" in queued and "--name baseline-pdg-steps-s1" in queued
    dvc(project, "exp", "run", "--run-all")
    names = dvc(project, "exp", "list").stdout
    assert "baseline-s1" in names and "baseline-pdg-steps-s1" in names  # pdg is the baseline's experiment
    report = ablation("report", "--rows", "pdg", "baseline-pdg-steps", "--seeds", "1", "--figure", "ablation.png")
    shown = {exp: data for exp, data in experiments(json.loads(dvc(project, "exp", "show", "--json").stdout)).items()}
    pdg = shown["baseline-s1"]["metrics"]["metrics/pdg.json"]
    assert shown["baseline-s1"]["params"]["train"]["seed"] == 1
    machine = f"{pdg['machine']['cpu']} ({pdg['machine']['isa']})"
    assert f"| pdg | {machine} | 1 | {pdg['R1']:.2f} | {pdg['R5']:.2f} |" in report
    steps = shown["baseline-pdg-steps-s1"]["metrics"]["metrics/train_baseline.json"]["steps"]
    assert abs(steps - pdg_steps) <= baseline_epoch_steps / 2  # the baseline row ran pdg's optimiser steps
    assert (project / "ablation.png").stat().st_size > 3000
