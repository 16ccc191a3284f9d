"""Atomic writes: a killed stage never leaves a half-written file under its final name."""

from __future__ import annotations

import json
import os
from pathlib import Path


def temp_path_for(path: str | Path) -> Path:
    """A sibling temporary name (same folder, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def commit_temp(tmp: Path, path: str | Path) -> None:
    os.replace(tmp, path)


def write_bytes_atomic(path: str | Path, payload: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    tmp.write_bytes(payload)
    commit_temp(tmp, path)


def write_json_atomic(path: str | Path, payload) -> None:
    """Pretty, key-sorted JSON so that equal content gives equal bytes."""
    write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8"))
