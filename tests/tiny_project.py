"""Helpers the test modules share: a throw-away copy of the project with the tiny test profile (for
running real `dvc repro`), the tiny training and generator settings, the tiny configuration trained
as a stage or in a subprocess, and broken copies of the CUHK-PEDES excerpt."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.stage_command import stage_command  # noqa: F401  (the tests take it from here)
from pipeline.core.config import deep_merge  # noqa: F401  (the tests take it from here)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("TBPS_FIXTURES", REPO.parent / "shared" / "fixtures"))

# A dual encoder small enough to build in a test (random weights).
TINY_MODEL = {"width": 32, "layers": 1, "heads": 2, "patch_size": 8, "vocab_size": 200, "embed_dim": 32,
              "max_text_length": 32}

# Overrides of params.yaml that make every stage run in seconds.
TINY_PROFILE = {
    "data": {"shard_size": 16},
    "synth": {"num_train_ids": 16, "num_val_ids": 4, "num_test_ids": 6, "images_per_id": 2, "contact_sheet_ids": 3},
}

# A model and schedule small enough for a few seconds of CPU training (over TINY_PROFILE).
TINY_TRAINING = {
    "data": {"image_height": 32, "image_width": 16, "shard_size": 8},
    "model": {"width": 32, "layers": 1, "heads": 2, "patch_size": 8, "vocab_size": 200, "embed_dim": 32,
              "max_text_length": 32},
    "train": {"epochs": 2, "batch_size": 8, "checkpoint_every": 2, "num_workers": 0,
              "eval_batch_size": 16},
}

# params.yaml's generator section at toy size: 32x16 images, a few steps of each part.
TINY_GENERATOR_PARAMS = {
    "height": 32, "width": 16, "vae_channels": [8, 16], "vae_steps": 100, "vae_batch_size": 8,
    "vae_lr": 3e-3, "unet_channels": [16, 32], "unet_steps": 60, "unet_batch_size": 16, "unet_lr": 2e-3,
    "text_encoder": "clip", "text_width": 16, "text_layers": 1, "sample_steps": 3, "latent_channels": 4,
}


def require_fixture(path: Path) -> Path:
    """A file or folder of the shared fixtures: skipped where they are absent, a failure in CI
    (which always has them)."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"shared fixture {path} missing, and CI is set: CI must have ../shared/fixtures")
        pytest.skip(f"shared fixture {path} not found (set TBPS_FIXTURES to the fixtures folder)")
    return path


def make_tiny_project(dest: Path, overrides: dict | None = None, git: bool = False) -> Path:
    """Copy code, dvc.yaml and the tiny params into `dest` and initialise DVC there (in a git
    repository when `git`, as `dvc exp` needs one)."""
    for name in ("pipeline", "stages", "experiments"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", dest / "dvc.yaml")
    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_PROFILE)
    params = deep_merge(params, overrides or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if git:
        subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
        dvc(dest, "init", "-q")
    else:
        dvc(dest, "init", "--no-scm", "-q")
    dvc(dest, "config", "core.analytics", "false")
    return dest


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the venv's dvc in `project`, with the venv's python first on PATH (stage commands use it)."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([str(bin_dir / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result



def stale_stages(project: Path, *targets: str) -> dict:
    """`dvc status --json` of the project (or targets), less the `externals` stage: it is always
    run (it re-reads the folders params name), so DVC always lists it as "always changed"."""
    import json

    status = json.loads(dvc(project, "status", "--json", *targets).stdout or "{}")
    if status.get("externals") == ["always changed"]:
        del status["externals"]
    return status


def save_tiny_model(folder: Path, prepared: Path, seed: int = 0) -> None:
    """A random TINY_MODEL dual encoder (its tokenizer from `prepared`'s train captions) saved to `folder`."""
    import torch

    from pipeline.core.config import ModelConfig
    from pipeline.evaluation import load_retrieval_split
    from pipeline.models import build_model

    torch.manual_seed(seed)
    captions = load_retrieval_split(prepared, "train").captions
    model = build_model(ModelConfig(**TINY_MODEL), (64, 32), captions=captions)
    model.save_pretrained(folder)


def assert_calibrated(calibration: dict, most_pairs: int) -> None:
    """The filter's calibration is well formed: real pairs measured, ordered quantiles, and each
    threshold the quantile of its distribution at its level."""
    from pipeline.pdg.calibration import LEVELS

    assert 1 <= calibration["real_pairs"] <= most_pairs
    for name, threshold, level in (("preference", "margin_threshold", "margin_level"),
                                   ("similarity", "similarity_threshold", "similarity_level")):
        levels = [calibration[name][level] for level in LEVELS]  # the file's keys are sorted by name
        assert levels == sorted(levels) and all(np.isfinite(levels))
        assert calibration[name]["min"] <= calibration[threshold] <= calibration[name]["max"]
        if calibration[level] == 0.0:
            assert calibration[threshold] == calibration[name]["min"]
    assert 0.0 <= calibration["preferred_share"] <= 1.0


def fixed_calibration(margin: float, similarity: float):
    """A filter calibration whose thresholds are exactly `margin` and `similarity` (level 0 of one value each)."""
    from pipeline.pdg.calibration import Calibration

    return Calibration(np.array([margin]), np.array([similarity]), margin_level=0.0, similarity_level=0.0)
