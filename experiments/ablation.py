"""The PDG ablation as DVC experiments: one named experiment per row and seed, read back from
`dvc exp show --json` into mean ± std tables and a figure.

    python -m experiments.ablation queue --rows baseline pdg --seeds 0 1 2   # dvc exp run --queue, per row and seed
    dvc exp run --run-all                                                    # or: dvc queue start; dvc queue status
    python -m experiments.ablation report --rows baseline pdg                # the table (--figure PNG, --rev COMMIT)
    dvc exp show                                                             # every row and seed, as DVC lists them

An experiment is named `<row>-s<seed>`; its params are the row's `-S` overrides and `train.seed`,
so DVC reruns exactly the stages they touch (a seed retrains both variants, and the filter, whose
scorer is that seed's baseline). Rows with the same overrides share one experiment (`baseline` and
`pdg` are `baseline-s<seed>`): the train stages' persistent outputs keep DVC's run cache from
restoring a stage another experiment already ran, so a second one would train it again. A row's figures are the test metrics of its variant's evaluate stage
(`metrics/<variant>.json`), which records the machine it ran on: a table never mixes machines
unlabelled. Run `dvc repro` first (rows matching optimiser steps read the training manifests).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.core.config import ConfigError, Params, deep_merge, params_from_dict
from pipeline.data.canonical import manifest_path, read_manifest
from pipeline.data.loader import count_pairs
from pipeline.training import steps_per_epoch

METRICS = ("R1", "R5", "R10", "mAP", "mINP")
NO_TEXT = {"variants.pdg.online.text_prob": 0.0}
NO_MIXUP = {"variants.pdg.online.mixup_prob": 0.0}
ORIGINAL_PAIRS = {"variants.pdg.data": "data/prepared"}

# row -> (the variant whose metrics it reports, its params overrides, the variant whose optimiser
# steps its epochs must match, if any: proximity pairs lengthen pdg's epoch, so a gain must beat
# the baseline at equal steps too)
ROWS: dict[str, tuple[str, dict, str | None]] = {
    "baseline": ("baseline", {}, None),
    "baseline-pdg-steps": ("baseline", {}, "pdg"),
    "pdg": ("pdg", {}, None),
    "offline": ("pdg", {**NO_TEXT, **NO_MIXUP}, None),          # proximity pairs only, no online PDG
    "offline-text": ("pdg", NO_MIXUP, None),                     # proximity pairs + approximate text
    "offline-mixup": ("pdg", NO_TEXT, None),                     # proximity pairs + feature mixup
    "filter-off": ("pdg", {"filter.enabled": False}, None),      # every generated pair kept
    "img2img": ("pdg", {"pdg.method": "img2img"}, None),         # SDEdit instead of Prompt-to-Prompt
    "oracle": ("pdg", {"pdg.method": "oracle"}, None),           # SynthPedes' true edits: every edit right
    "samples-1": ("pdg", {"pdg.num_samples": 1}, None),
    "samples-4": ("pdg", {"pdg.num_samples": 4}, None),
    "text-only": ("pdg", {**NO_MIXUP, **ORIGINAL_PAIRS}, None),  # approximate text on the original pairs
    "text-only-pdg-steps": ("pdg", {**NO_MIXUP, **ORIGINAL_PAIRS}, "pdg"),
}


def experiment_name(row: str, seed: int) -> str:
    return f"{row}-s{seed}"


def same_experiment(row: str) -> list[str]:
    """The rows whose experiment is this row's (same overrides): `baseline` and `pdg` are one
    experiment that trains both variants. Its first row in ROWS names it."""
    return [other for other, (_, overrides, match) in ROWS.items() if (overrides, match) == ROWS[row][1:]]


def nested(overrides: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}: dotted `-S` overrides as a params tree."""
    tree: dict = {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def row_overrides(row: str, seed: int, project: Path = Path(".")) -> dict:
    """The `-S` overrides of one experiment: the row's, its seed and, for a step-matched row, the
    epochs (under the row's own params) that give the target variant's optimiser steps."""
    variant, overrides, match = ROWS[row]
    overrides = {**overrides, "train.seed": seed}
    if match is not None:
        raw = yaml.safe_load((project / "params.yaml").read_text())
        try:
            here, mine = params_from_dict(raw), params_from_dict(deep_merge(raw, nested(overrides)))
            target_steps = here.train.epochs * _steps_per_epoch(here, match, project)
            overrides["train.epochs"] = round(target_steps / _steps_per_epoch(mine, variant, project))
        except ConfigError as error:
            raise SystemExit(f"error: {error}") from None
    return overrides


def _steps_per_epoch(params: Params, variant: str, project: Path) -> int:
    manifest = manifest_path(project / params.variant(variant).data, "train")
    if not manifest.is_file():
        raise SystemExit(f"{manifest} is missing: run `dvc repro` first (step-matched rows count its pairs)")
    return steps_per_epoch(count_pairs(read_manifest(manifest)), params.train.batch_size)


def queue_command(row: str, seed: int, project: Path = Path(".")) -> list[str]:
    command = ["dvc", "exp", "run", "--queue", "--name", experiment_name(row, seed)]
    for key, value in row_overrides(row, seed, project).items():
        command += ["--set-param", f"{key}={json.dumps(value) if isinstance(value, bool) else value}"]
    return command


# ------------------------------------------------------------------ reading `dvc exp show --json`


def experiments(show: list) -> dict[str, dict]:
    """name -> {"params": params.yaml as a dict, "metrics": {file: its data}, "rev": its commit} of
    every finished, named experiment in `dvc exp show --json` output (DVC 3's layout)."""
    found = {}
    for commit in show:
        for group in commit.get("experiments") or []:
            if (group.get("executor") or {}).get("state") not in (None, "success"):
                continue  # queued or running: its metrics are still its baseline commit's
            for revision in group.get("revs") or []:
                data, name = revision.get("data") or {}, revision.get("name")
                if not name or revision.get("error") or not data.get("metrics"):
                    continue
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                metrics = {path: entry.get("data", {}) for path, entry in data["metrics"].items()}
                found[name] = {"params": params, "metrics": metrics, "rev": revision.get("rev")}
    return found


def results(found: dict[str, dict], rows: list[str]) -> dict[str, list[dict]]:
    """Per row, one record per seed: its variant's test metrics and the machine they came from."""
    table: dict[str, list[dict]] = {}
    for row in rows:
        variant = ROWS[row][0]
        for name, exp in sorted(found.items()):
            prefix, _, seed = name.rpartition("-s")
            if prefix not in same_experiment(row) or not seed.isdigit():
                continue
            metrics = exp["metrics"].get(f"metrics/{variant}.json")
            if not metrics or not all(k in metrics for k in METRICS):
                continue
            if any(r["seed"] == int(seed) for r in table.get(row, [])):
                continue  # one experiment per row and seed (an older run under another row's name)
            table.setdefault(row, []).append({"seed": int(seed), **{k: metrics[k] for k in METRICS},
                                              "machine": _machine_label(metrics.get("machine"))})
    return table


def _machine_label(machine: dict | None) -> str:
    if not machine:
        return "unrecorded"
    return f"{machine.get('cpu', '?')} ({machine.get('isa', '?')})"


def markdown(table: dict[str, list[dict]]) -> str:
    lines = ["| row | machine | seeds | R1 | R5 | R10 | mAP | mINP |", "|---|---|---|---|---|---|---|---|"]
    for row, records in table.items():
        for machine in sorted({r["machine"] for r in records}):
            mine = [r for r in records if r["machine"] == machine]
            cells = []
            for key in METRICS:
                values = [r[key] for r in mine]
                spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
                cells.append(f"{statistics.fmean(values):.2f}{spread}")
            seeds = ", ".join(str(r["seed"]) for r in sorted(mine, key=lambda r: r["seed"]))
            lines.append(f"| {row} | {machine} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, list[dict]], path: Path) -> None:
    from pipeline.plots import plt, save_figure

    figure, axis = plt.subplots(figsize=(max(4.0, 1.5 + 0.9 * len(table)), 3.4))
    for index, (row, records) in enumerate(table.items()):
        values = [r["R1"] for r in records]
        axis.bar(index, statistics.fmean(values), color="#8aa6c8" if ROWS[row][0] == "pdg" else "#c8c8c8")
        axis.scatter([index] * len(values), values, color="black", s=10, zorder=3)
    axis.set_xticks(range(len(table)), list(table), rotation=30, ha="right")
    axis.set_ylabel("test R1 (%)")
    axis.set_title("test R1, mean over seeds (dots: seeds)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.ablation", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("queue", "report"):
        sub = commands.add_parser(name)
        sub.add_argument("--rows", nargs="+", default=["baseline", "pdg"], choices=list(ROWS))
        sub.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    commands.choices["report"].add_argument("--out", type=Path, help="also write the table to this markdown file")
    commands.choices["report"].add_argument("--figure", type=Path, help="and a bar chart of R1 to this PNG")
    commands.choices["report"].add_argument("--rev", default="HEAD",
                                            help="the commit the experiments were queued from (default HEAD)")
    args = parser.parse_args(argv)
    if args.command == "queue":
        queued = set()
        for row in args.rows:
            for seed in args.seeds:
                name = experiment_name(same_experiment(row)[0], seed)
                if name in queued:
                    continue
                queued.add(name)
                command = queue_command(same_experiment(row)[0], seed)
                print(" ".join(command), flush=True)
                subprocess.run(command, check=True)
        print("queued; run them with `dvc exp run --run-all` (or `dvc queue start`)")
        return 0
    shown = subprocess.run(["dvc", "exp", "show", "--json", "--rev", args.rev], check=True, capture_output=True,
                           text=True).stdout
    table = results(experiments(json.loads(shown)), args.rows)
    table = {row: [r for r in records if r["seed"] in args.seeds] for row, records in table.items()}
    missing = [experiment_name(r, s) for r in args.rows for s in args.seeds
               if s not in {x["seed"] for x in table.get(r, [])}]
    if missing:
        print(f"not (yet) in `dvc exp show`: {', '.join(missing)}", file=sys.stderr)
    text = markdown({row: records for row, records in table.items() if records})
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    if args.figure and any(table.values()):
        plot({row: records for row, records in table.items() if records}, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
