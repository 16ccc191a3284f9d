"""Figures that say why the hardness study's rows differ: the negatives' weights, training's
curves, and what the rank-1 mistakes get wrong. Reads the experiments that
`python -m experiments.hardness queue` made (their models from the DVC cache, their curves from
their commits) and writes, from the repository root after `dvc exp run --run-all`:

    python -m experiments.hardness_diagnostics --rows beta-0 beta-1 beta-2 beta-4 beta-8 tau-0.005 --seed 0

- docs/figures/hardness_negatives.png: the effective number of negatives per query
  (exp of the entropy of the negatives' weights, in batches of the training split's pairs):
  of the hardness weights w_ij alone (every beta on the beta-0 model's similarities, and each
  row on its own model), and of the gradient, which also carries exp(s_ij / tau).
- docs/figures/hardness_curves.png: training loss per step, val R1 and the temperature per epoch.
- docs/figures/hardness_confusions.png: per attribute, the share of rank-1 mistakes whose
  top-ranked person differs from the query's (benchmarks/bench_confusions.py on each model).
- experiments/results/hardness_diagnostics.json: the figures' numbers.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from experiments.hardness import check_row, experiment_name, shown
from pipeline.evaluation import embed_retrieval_split, load_retrieval_split
from pipeline.core.io import write_json_atomic
from pipeline.losses import hardness_log_weights
from pipeline.models import DualEncoder

MODEL = "models/baseline/best"


def materialise(rev: str, dest: Path) -> Path:
    """The experiment's best model, copied out of the DVC cache by its commit's dvc.lock."""
    from dvc.api import DVCFileSystem

    DVCFileSystem(".", rev=rev).get(MODEL, str(dest), recursive=True)
    return dest


def committed_text(rev: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout


def training_batches(data, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Caption indices in batches of `batch_size`, as the trainer draws pairs: one caption and its image each."""
    order = torch.randperm(len(data.captions), generator=torch.Generator().manual_seed(seed))
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def _effective(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(entropy) per row of the weights on `mask`, normalised to sum to 1 there."""
    p = weights.masked_fill(~mask, 0.0)
    p = p / p.sum(dim=1, keepdim=True)
    entropy = -(p * p.clamp(min=1e-30).log()).sum(dim=1)
    return entropy.exp()


def negative_statistics(similarity: torch.Tensor, positives: torch.Tensor, beta: float, temperature: float) -> dict:
    """Per batch, image-to-text: the negatives per query, the effective number under the hardness
    weights alone and under the gradient (softmax of s/tau + log w), and the gradient's share on negatives."""
    negatives = ~positives
    log_w = hardness_log_weights(similarity, negatives, beta)
    hard = _effective(log_w.exp(), negatives)
    softmax = (similarity / temperature + log_w).softmax(dim=1)
    gradient = _effective(softmax, negatives)
    keep = negatives.any(dim=1)
    return {
        "negatives": negatives.sum(1)[keep].float().mean().item(),
        "effective_hardness": hard[keep].mean().item(),
        "effective_gradient": gradient[keep].mean().item(),
        "negative_mass": softmax.masked_fill(~negatives, 0).sum(1)[keep].mean().item(),
    }


def batch_statistics(text_emb, image_emb, data, batches, beta: float, temperature: float) -> dict:
    owners, pids = torch.tensor(data.caption_image_index), data.caption_pids
    rows = []
    for batch in batches:
        similarity = image_emb[owners[batch]] @ text_emb[batch].T
        rows.append(negative_statistics(similarity, pids[batch][:, None] == pids[batch][None, :], beta, temperature))
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


def curves(rev: str) -> dict:
    steps = list(csv.DictReader(io.StringIO(committed_text(rev, "reports/train/baseline/steps.csv"))))
    epochs = json.loads(committed_text(rev, "reports/train/baseline/epochs.json"))
    return {"loss": [float(r["loss"]) for r in steps], "val_R1": [e["val_R1"] for e in epochs],
            "temperature": [e["temperature"] for e in epochs]}


def _smooth(values: list[float], window: int = 25) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot_negatives(result: dict, path: Path) -> None:
    from pipeline.plots import plt, save_figure

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    sweep = result["beta_sweep_on_beta0_model"]
    betas = [float(b) for b in sweep]
    axes[0].plot(betas, [s["effective_hardness"] for s in sweep.values()], "o-", color="#888", label="beta-0 model, every beta")
    rows = result["rows"]
    for row, stats in rows.items():
        axes[0].scatter(stats["beta"], stats["effective_hardness"], zorder=3, label=f"{row} (own model)")
    axes[0].axhline(next(iter(sweep.values()))["negatives"], color="#bbb", ls=":", lw=1, label="negatives per query")
    axes[0].set_xlabel("beta")
    axes[0].set_ylabel("effective negatives per query")
    axes[0].set_title("hardness weights w alone", fontsize=9)
    axes[0].legend(fontsize=6)
    names = list(rows)
    axes[1].bar(range(len(names)), [rows[r]["effective_gradient"] for r in names], color="#8aa6c8")
    for i, r in enumerate(names):
        axes[1].text(i, rows[r]["effective_gradient"], f"tau {rows[r]['temperature']:.3f}", ha="center", va="bottom", fontsize=6)
    axes[1].set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes[1].set_ylabel("effective negatives per query")
    axes[1].set_title("in the gradient: softmax(s / tau + log w) over negatives", fontsize=9)
    figure.tight_layout()
    save_figure(figure, path)


def plot_curves(traces: dict[str, dict], path: Path) -> None:
    from pipeline.plots import plt, save_figure

    figure, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for row, trace in traces.items():
        axes[0].plot(_smooth(trace["loss"]), lw=1, label=row)
        epochs = range(1, len(trace["val_R1"]) + 1)
        axes[1].plot(epochs, trace["val_R1"], "o-", ms=3, lw=1, label=row)
        axes[2].plot(epochs, trace["temperature"], "o-", ms=3, lw=1, label=row)
    axes[0].set(xlabel="step", ylabel="training loss (mean of 25 steps)", title="loss (its scale moves with beta and tau)")
    axes[1].set(xlabel="epoch", ylabel="val R1 (%)", title="val R1 per epoch")
    axes[2].set(xlabel="epoch", ylabel="temperature", yscale="log", title="temperature")
    for axis in axes:
        axis.title.set_fontsize(9)
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def plot_confusions(confusions: dict[str, dict], random_pair: dict, path: Path) -> None:
    from pipeline.plots import plt, save_figure

    attributes = list(next(iter(confusions.values()))["attribute_differs_pct"])
    figure, axis = plt.subplots(figsize=(11, 3.6))
    width = 0.8 / len(confusions)
    for index, (row, result) in enumerate(confusions.items()):
        values = [result["attribute_differs_pct"][a] for a in attributes]
        axis.bar([x + index * width for x in range(len(attributes))], values, width,
                 label=f"{row} ({result['rank1_mistakes']} mistakes)")
    for x, name in enumerate(attributes):
        axis.plot([x - width / 2, x + 0.8 - width / 2], [random_pair["attribute_differs_pct"][name]] * 2, color="black",
                  lw=1.5, label="another person at random" if x == 0 else None)
    axis.set_xticks([x + 0.4 - width / 2 for x in range(len(attributes))], attributes, rotation=30, ha="right")
    axis.set_ylim(0, 125)
    axis.set_ylabel("% of rank-1 mistakes")
    axis.set_title("rank-1 mistakes whose top-ranked person differs in the attribute (test split)", fontsize=9)
    axis.legend(fontsize=7, ncol=4, loc="upper center")
    figure.tight_layout()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.hardness_diagnostics", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rev", nargs="+", help="the commit(s) the experiments were queued at (default: HEAD)")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"))
    parser.add_argument("--out", type=Path, default=Path("experiments/results/hardness_diagnostics.json"))
    args = parser.parse_args(argv)
    overrides = {row: check_row(row) for row in args.rows}
    found = shown(args.rev)
    names = {row: experiment_name(row, args.seed) for row in args.rows}
    missing = [name for name in names.values() if name not in found]
    if missing:
        raise SystemExit(f"error: not in `dvc exp show`: {', '.join(missing)}")
    try:
        data = load_retrieval_split(args.prepared, "train")
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err} (--prepared; run `dvc repro prepare`)") from None
    batches = training_batches(data, args.batch_size)
    result: dict = {"command": "python -m experiments.hardness_diagnostics " + " ".join(argv or sys.argv[1:]),
                    "batches": len(batches), "batch_size": args.batch_size, "rows": {}}
    traces, folders = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for row, name in names.items():
            rev = found[name]["rev"]
            folders[row] = materialise(rev, Path(scratch) / row)
            model = DualEncoder.from_pretrained(folders[row]).eval()
            text_emb, image_emb = embed_retrieval_split(model, data, 256, torch.device("cpu"))
            beta, temperature = overrides[row]["loss.beta"], model.temperature().item()
            result["rows"][row] = {"beta": beta, "temperature": temperature,
                                   **batch_statistics(text_emb, image_emb, data, batches, beta, temperature)}
            if row == "beta-0":
                result["beta_sweep_on_beta0_model"] = {
                    str(b): batch_statistics(text_emb, image_emb, data, batches, b, temperature)
                    for b in (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)}
            traces[row] = curves(rev)
            # batches with a non-finite loss are skipped by the trainer and counted, not logged
            result["rows"][row]["skipped_batches"] = found[name]["metrics"]["metrics/train_baseline.json"].get("skipped_batches", 0)
            print(f"{row}: {json.dumps({k: round(v, 3) for k, v in result['rows'][row].items()})}", flush=True)
        confusions_json = Path(scratch) / "confusions.json"
        subprocess.run([sys.executable, "benchmarks/bench_confusions.py", "--prepared", str(args.prepared),
                        "--out", str(confusions_json), "--models", *map(str, folders.values())], check=True)
        confusions = json.loads(confusions_json.read_text())
        result["confusions"] = {row: confusions["models"][str(folder)] for row, folder in folders.items()}
        result["confusions_random_other_person"] = confusions["random_other_person"]
    args.figures.mkdir(parents=True, exist_ok=True)
    if "beta_sweep_on_beta0_model" in result:
        plot_negatives(result, args.figures / "hardness_negatives.png")
    else:
        print("no beta-0 row: hardness_negatives.png (every beta on the beta-0 model) not drawn", file=sys.stderr)
    plot_curves(traces, args.figures / "hardness_curves.png")
    plot_confusions(result["confusions"], result["confusions_random_other_person"], args.figures / "hardness_confusions.png")
    write_json_atomic(args.out, result)
    print(f"wrote {args.out} and hardness_*.png under {args.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
