"""A stage's command as dvc.yaml gives it, for running one stage by hand.

`python -m pipeline.stage_command train@baseline` prints what follows `python -m`, here
`stages.train --variant baseline --prepared data/prepared ...`. So under a launcher one runs

    accelerate launch --multi_gpu --num_processes 4 -m $(python -m pipeline.stage_command train@baseline)

Benchmarks and tests run stages with it too."""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stage_command(name: str, *extra: str, repo: Path = REPO) -> list[str]:
    """The command of stage `name` (e.g. "train@baseline"), rendered by DVC from `repo`'s
    dvc.yaml and params, with this interpreter for `python`: exactly what `dvc repro` runs."""
    from dvc.repo import Repo

    with contextlib.chdir(repo), Repo(str(repo)) as dvc_repo:  # DVC resolves stage names from the cwd
        words = shlex.split(dvc_repo.stage.collect(name)[0].cmd)
    if words[0] != "python":
        raise ValueError(f"stage {name}: the command does not start with python: {words}")
    return [sys.executable, *words[1:], *extra]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m pipeline.stage_command <stage>   (e.g. train@baseline)")
    from dvc.stage.exceptions import StageNotFound

    try:
        print(shlex.join(stage_command(sys.argv[1])[2:]))
    except StageNotFound:
        raise SystemExit(f"error: no stage {sys.argv[1]!r} in dvc.yaml (`dvc stage list` names them)") from None
