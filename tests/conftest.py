"""Shared test fixtures: the real data excerpts under ../shared/fixtures, the tiny profile prepared once,
trainings of the tiny configuration in subprocesses, and the stage server."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

FIXTURES_DIR = Path(os.environ.get("TBPS_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """The tiny SynthPedes profile prepared once (tests/tiny_project.py's TINY_PROFILE), read-only."""
    from pipeline.core.config import params_from_dict
    from pipeline.data.prepare import prepare
    from tiny_project import TINY_PROFILE

    out = tmp_path_factory.mktemp("prepared")
    prepare(params_from_dict(TINY_PROFILE), out)
    return out


@pytest.fixture
def cuhk_mini() -> Path:
    """The real CUHK-PEDES excerpt, read-only."""
    from tiny_project import require_fixture

    return require_fixture(FIXTURES_DIR / "cuhk-pedes-mini" / "reid_raw.json").parent


@pytest.fixture
def cuhk_copy(cuhk_mini: Path, tmp_path: Path) -> Path:
    """A writable copy of the CUHK-PEDES excerpt, for tests that break it."""
    return Path(shutil.copytree(cuhk_mini, tmp_path / "cuhk-pedes-mini"))


@pytest.fixture(scope="session")
def training_driver(tmp_path_factory):
    """tiny_project.TrainingDriver: trainings of TINY_TRAINING in subprocesses, on data prepared once
    and on a copy of pipeline/ and stages/ taken once (test_resume.py and test_atomic_swaps.py share it)."""
    from pipeline.data.prepare import prepare
    from tiny_project import REPO, TrainingDriver, training_params

    code = tmp_path_factory.mktemp("code")
    for package in ("pipeline", "stages"):
        shutil.copytree(REPO / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    prepared = tmp_path_factory.mktemp("state") / "prepared"
    prepare(training_params(), prepared)
    return TrainingDriver(code, prepared)


@pytest.fixture(scope="session")
def straight_training(training_driver) -> Path:
    """The output folder of a training never interrupted (its timing file beside it), read-only."""
    out = training_driver.prepared.parent / "straight"
    training_driver.trained(out, timing=training_driver.prepared.parent / "straight-timing.json")
    return out


@pytest.fixture(scope="session")
def stage_runner():
    """A tests/stage_server.StageServer: `python -m` commands (a stage's, as DVC renders it) run in
    children forked from one interpreter that imported torch and every stage once, with one thread and
    the venv first on PATH (as `dvc repro` finds python). Its run() returns a CompletedProcess."""
    from stage_server import StageServer

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    with StageServer(env) as server:
        yield server
