"""benchmarks/results/scale.json, written by several benchmarks (bench_scale: `loader`, `identity_spread`,
`decode`; bench_digests: `digests`; bench_search: `search`): one merge for all of them."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

SCALE = Path(__file__).resolve().parent / "results" / "scale.json"


def merge_rows(key: str, rows: list[dict], match: tuple[str, ...], out: Path = SCALE) -> None:
    """Replace the rows of `key` that agree with a new row on every field of `match`, keep every other
    row and key, write the file back atomically, under a lock on the results folder (benchmarks run
    one after another, but a second writer must not lose the first one's rows)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        payload = json.loads(out.read_text()) if out.is_file() else {}
        if not isinstance(payload, dict):
            raise SystemExit(f"{out} is not a JSON object: not overwriting it")
        fresh = {tuple(row.get(m) for m in match) for row in rows}
        payload[key] = [r for r in payload.get(key, []) if tuple(r.get(m) for m in match) not in fresh] + rows
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, out)
    finally:
        os.close(lock)
