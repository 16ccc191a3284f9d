"""The hardness study: what `loss.beta` (hardness weighting of negatives) and the temperature do
to retrieval, as DVC experiments on the baseline variant, chosen on the val split.

    python -m experiments.hardness queue --rows beta-0 beta-1 beta-2 beta-4 beta-8 tau-0.005 beta-1-tau-0.02
    dvc exp run --run-all                                         # or: dvc queue start; dvc queue status
    python -m experiments.hardness report --default beta-0 --out docs/hardness_table.md --figure docs/figures/hardness.png
    dvc exp show                                                  # every row and seed, as DVC lists them

A row's name says its loss: `beta-<b>` trains with `loss.beta = b` and a learned temperature
initialised at 0.07; `tau-<t>` fixes the temperature at t (not learned), beta 0;
`beta-<b>-tau-<t>` both. An experiment is `<row>-s<seed>` and runs `evaluate@baseline`
and what it needs (train@baseline), not the PDG chain: the study is of the loss on the original
pairs, so each takes minutes, not the whole DAG's time. The filter's scorer is the baseline model,
so a changed default reaches the pdg variant through `dvc repro`, not through these experiments.

The default is chosen on val only (mean over seeds of the best-epoch val R1, then val mAP, from
metrics/train_baseline.json); test R1/R5/R10/mAP/mINP and the colour-edit sensitivity are
reported for every row, never used to choose.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from experiments.ablation import METRICS, experiments, nested
from pipeline.core.config import ConfigError, deep_merge, params_from_dict

TARGET = "evaluate@baseline"
LEARNED_FROM = 0.07  # where a learned temperature starts (the default before this study)
DEFAULT_ROWS = ("beta-0", "beta-1", "beta-2", "beta-4", "beta-8", "tau-0.005", "beta-1-tau-0.02")
NUMBER = r"\d+(?:\.\d+)?"
ROW = re.compile(rf"^(?:beta-(?P<beta>{NUMBER})(?:-tau-(?P<tau>{NUMBER}))?|tau-(?P<tau_only>{NUMBER}))$")


def row_overrides(row: str) -> dict:
    """The `-S` overrides a row name stands for (see the module docstring): every loss setting is
    set, so a row means the same whatever the shipped defaults are."""
    match = ROW.match(row)
    if not match:
        raise ValueError(f"row {row!r}: expected beta-<b>, tau-<t> or beta-<b>-tau-<t> (e.g. beta-2-tau-0.02)")
    tau = match["tau"] or match["tau_only"]
    overrides: dict = {"loss.beta": float(match["beta"] or 0.0)}
    if tau is None:
        overrides["model.init_temperature"] = LEARNED_FROM
        overrides["model.learn_temperature"] = True
    else:
        overrides["model.init_temperature"] = float(tau)
        overrides["model.learn_temperature"] = False
    return overrides


def check_row(row: str, project: Path = Path(".")) -> dict:
    """The row's overrides, validated against the project's params (one line on a bad value)."""
    try:
        overrides = row_overrides(row)
        raw = yaml.safe_load((project / "params.yaml").read_text())
        params_from_dict(deep_merge(raw, nested(overrides)))
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


# ------------------------------------------------------------------ the table and the choice

VAL = ("val_R1", "val_mAP")


def records(found: dict[str, dict], rows: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    """Per row, one record per finished seed: val (best epoch) and test metrics of the baseline
    variant, its colour-edit sensitivity and its skipped (non-finite) batches."""
    table: dict[str, list[dict]] = {}
    for row in rows:
        for seed in seeds:
            exp = found.get(experiment_name(row, seed))
            if exp is None:
                continue
            train, test = exp["metrics"].get("metrics/train_baseline.json"), exp["metrics"].get("metrics/baseline.json")
            if not train or not test or not all(k in test for k in METRICS):
                continue
            table.setdefault(row, []).append({
                "seed": seed, "rev": exp["rev"], "val_R1": train["best_val_R1"], "val_mAP": train["best_val_mAP"],
                **{k: test[k] for k in METRICS},
                "colour": test.get("colour_sensitivity", {}).get("all", {}).get("prefers_true_pct"),
                "skipped": train.get("skipped_batches", 0),
            })
    return table


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary(table: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float] | None]]:
    """Per row and figure, (mean, std) over its seeds; None where no seed has the figure."""
    keys = (*VAL, *METRICS, "colour")
    stats: dict = {}
    for row, recs in table.items():
        stats[row] = {}
        for key in keys:
            values = [r[key] for r in recs if r[key] is not None]
            stats[row][key] = _mean_std(values) if values else None
    return stats


def choose(table: dict[str, list[dict]], stats: dict, default: str) -> tuple[str, str]:
    """(the row to make the default, why): the best mean val R1 (then val mAP) among rows with the
    default's seeds; it replaces the default only if its mean val R1 beats the default's by more
    than the larger seed std of the two. Needs the default row at two seeds or more."""
    seeds = {row: sorted(r["seed"] for r in recs) for row, recs in table.items()}
    if default not in table or len(seeds[default]) < 2:
        raise SystemExit(f"error: choosing needs the default row {default} at two seeds or more")
    comparable = [row for row in table if seeds[row] == seeds[default]]
    best = max(comparable, key=lambda row: (stats[row]["val_R1"][0], stats[row]["val_mAP"][0]))
    if best == default:
        return best, f"{best} has the best mean val R1 ({stats[best]['val_R1'][0]:.2f}) of the rows at seeds {seeds[default]}"
    (mine, my_std), (theirs, their_std) = stats[best]["val_R1"], stats[default]["val_R1"]
    spread = max(my_std, their_std)
    if mine - theirs > spread:
        return best, f"{best}: val R1 {mine:.2f} vs {theirs:.2f} for {default}, a gain beyond the seed spread ({spread:.2f})"
    return default, (f"{best} has the best mean val R1 ({mine:.2f}) but {default} ({theirs:.2f}) is within the "
                     f"seed spread ({spread:.2f}): the default stays")


def markdown(table: dict[str, list[dict]], stats: dict) -> str:
    head = ["row", "loss", "seeds", "val R1", "val mAP", *(f"test {k}" for k in METRICS), "colour edits (%)", "non-finite batches"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, recs in table.items():
        loss = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in row_overrides(row).items()) or "beta 0, learned tau"
        cells = ["-" if stats[row][k] is None else f"{stats[row][k][0]:.2f}" + (
                 f" ± {stats[row][k][1]:.2f}" if len(recs) > 1 else "") for k in (*VAL, *METRICS, "colour")]
        seeds = ", ".join(str(r["seed"]) for r in recs)
        lines.append(f"| {row} | {loss} | {seeds} | " + " | ".join(cells) + f" | {sum(r['skipped'] for r in recs)} |")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, list[dict]], path: Path) -> None:
    from pipeline.plots import plt, save_figure

    figure, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.2 * len(table) + 3), 3.4), sharey=False)
    for axis, key, title in ((axes[0], "val_R1", "val R1 (chooses)"), (axes[1], "R1", "test R1 (reported)")):
        for index, recs in enumerate(table.values()):
            values = [r[key] for r in recs]
            axis.bar(index, statistics.fmean(values), color="#c8c8c8" if key == "R1" else "#8aa6c8")
            axis.scatter([index] * len(values), values, color="black", s=10, zorder=3)
        axis.set_xticks(range(len(table)), list(table), rotation=30, ha="right")
        axis.set_ylabel(f"{title.split(' (')[0]} (%)")
        axis.set_title(f"{title}, mean over seeds (dots: seeds)", fontsize=9)
    figure.tight_layout()
    save_figure(figure, path)


def shown(revs: list[str] | None) -> dict[str, dict]:
    """The finished, named experiments of each commit in `revs` (default: HEAD's); a name found at
    two commits keeps the later commit's in the list."""
    found: dict[str, dict] = {}
    for rev in revs or [None]:
        command = ["dvc", "exp", "show", "--json", *(["--rev", rev] if rev else [])]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            said = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"error: `{' '.join(command)}` failed: {said}")
        found.update(experiments(json.loads(result.stdout)))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.hardness", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    queue = commands.add_parser("queue", help="queue one DVC experiment per row and seed (seed-major order)")
    queue.add_argument("--rows", nargs="+", required=True)
    queue.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    report = commands.add_parser("report", help="the table of every row (mean ± std over seeds) and the val choice")
    report.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS))
    report.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    report.add_argument("--default", default="tau-0.005", help="the row equal to the shipped params (tau-0.005 since "
                        "this study; beta-0 before it)")
    report.add_argument("--rev", nargs="+", help="the commit(s) the experiments were queued at (default: HEAD)")
    report.add_argument("--out", type=Path, help="also write the table (and the choice) to this markdown file")
    report.add_argument("--figure", type=Path, help="and val/test R1 per row to this PNG")
    args = parser.parse_args(argv)
    if args.command == "report":
        for row in args.rows:
            check_row(row)
        table = records(shown(args.rev), args.rows, args.seeds)
        missing = [experiment_name(r, s) for r in args.rows for s in args.seeds
                   if s not in {x["seed"] for x in table.get(r, [])}]
        if missing:
            print(f"not (yet) in `dvc exp show`: {', '.join(missing)}", file=sys.stderr)
        if not table:
            raise SystemExit("error: no finished experiment of these rows (queue them, then `dvc exp run --run-all`)")
        stats = summary(table)
        chosen, why = choose(table, stats, args.default)
        text = markdown(table, stats) + f"\nChosen on val: **{chosen}**. {why}.\n"
        print(text, end="")
        if args.out:
            args.out.write_text(text)
        if args.figure:
            plot(table, args.figure)
        return 0
    commands_to_run = [queue_command(row, seed) for seed in args.seeds for row in args.rows]
    for command in commands_to_run:
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
    print("queued; run them with `dvc exp run --run-all` (or `dvc queue start`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
