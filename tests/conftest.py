"""Shared test fixtures: the real data excerpts under ../shared/fixtures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

FIXTURES_DIR = Path(os.environ.get("TBPS_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


@pytest.fixture
def cuhk_mini() -> Path:
    """The real CUHK-PEDES excerpt, read-only."""
    path = FIXTURES_DIR / "cuhk-pedes-mini"
    if not (path / "reid_raw.json").is_file():
        pytest.skip(f"real CUHK-PEDES excerpt not found at {path} (set TBPS_FIXTURES to the fixtures folder)")
    return path


@pytest.fixture
def cuhk_copy(cuhk_mini: Path, tmp_path: Path) -> Path:
    """A writable copy of the CUHK-PEDES excerpt, for tests that break it."""
    return Path(shutil.copytree(cuhk_mini, tmp_path / "cuhk-pedes-mini"))
