"""Shared test fixtures: the real data excerpts under ../shared/fixtures."""

from __future__ import annotations

import os
import shutil
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
