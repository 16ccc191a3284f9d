"""The hardness study: what `loss.beta` (hardness weighting of negatives) and the temperature do
to retrieval, as DVC experiments on the baseline variant, chosen on the val split.

    python -m experiments.hardness queue --rows beta-0 beta-1 beta-2 beta-4 beta-8 tau-0.005 --seeds 0 1 2
    dvc exp run --run-all                                         # or: dvc queue start; dvc queue status
    python -m experiments.hardness report --out docs/hardness_table.md --figures docs/figures
    dvc exp show                                                  # every row and seed, as DVC lists them

A row's name says its loss: `beta-<b>` trains with `loss.beta = b` and the learned temperature
(initialised at `model.init_temperature`); `tau-<t>` fixes the temperature at t (not learned),
beta 0; `beta-<b>-tau-<t>` both. An experiment is `<row>-s<seed>` and runs `evaluate@baseline`
and what it needs (train@baseline), not the PDG chain: the study is of the loss on the original
pairs, so each takes minutes, not the whole DAG's time. The filter's scorer is the baseline model,
so a changed default reaches the pdg variant through `dvc repro`, not through these experiments.

The default is chosen on val only (mean over seeds of the best-epoch val R1, then val mAP, from
metrics/train_baseline.json); test R1/R5/R10/mAP/mINP and the colour-edit sensitivity are
reported for every row, never used to choose.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.config import ConfigError, deep_merge, params_from_dict

TARGET = "evaluate@baseline"
ROW = re.compile(r"^(?:beta-(?P<beta>\d+(?:\.\d+)?))?(?:-?tau-(?P<tau>\d+(?:\.\d+)?))?$")


def row_overrides(row: str) -> dict:
    """The `-S` overrides a row name stands for (see the module docstring)."""
    match = ROW.match(row)
    if not row or not match or row.startswith("-"):
        raise ValueError(f"row {row!r}: expected beta-<b>, tau-<t> or beta-<b>-tau-<t> (e.g. beta-2-tau-0.02)")
    overrides: dict = {}
    if match["beta"] is not None:
        overrides["loss.beta"] = float(match["beta"])
    if match["tau"] is not None:
        overrides["model.init_temperature"] = float(match["tau"])
        overrides["model.learn_temperature"] = False
    return overrides


def _nested(overrides: dict) -> dict:
    tree: dict = {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def check_row(row: str, project: Path = Path(".")) -> dict:
    """The row's overrides, validated against the project's params (one line on a bad value)."""
    try:
        overrides = row_overrides(row)
        raw = yaml.safe_load((project / "params.yaml").read_text())
        params_from_dict(deep_merge(raw, _nested(overrides)))
    except (ValueError, ConfigError) as error:
        raise SystemExit(f"error: {error}") from None
    return overrides


def experiment_name(row: str, seed: int) -> str:
    return f"{row}-s{seed}"


def queue_command(row: str, seed: int, project: Path = Path(".")) -> list[str]:
    command = ["dvc", "exp", "run", "--queue", "--name", experiment_name(row, seed)]
    for key, value in {**check_row(row, project), "train.seed": seed}.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        command += ["--set-param", f"{key}={text}"]
    return command + [TARGET]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.hardness", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    queue = commands.add_parser("queue", help="queue one DVC experiment per row and seed (seed-major order)")
    queue.add_argument("--rows", nargs="+", required=True)
    queue.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    commands_to_run = [queue_command(row, seed) for seed in args.seeds for row in args.rows]
    for command in commands_to_run:
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
    print("queued; run them with `dvc exp run --run-all` (or `dvc queue start`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
