"""The embedded baseline over several seeds: test metrics (mean, std), time, throughput.

Each seed trains and evaluates in its own copy of the project (sharing the prepared data
of this checkout), exactly as `dvc repro` runs the stages; a randomly initialised model
scored the same way gives the floor. Run from the repository root after `dvc repro prepare`:

    python benchmarks/bench_baseline.py --seeds 0 1 2

Writes benchmarks/results/baseline.json and prints a Markdown table for README.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import yaml

from pipeline.core.config import load_params
from pipeline.evaluation import evaluate_retrieval, load_retrieval_split
from pipeline.data.canonical import manifest_path, read_manifest
from pipeline.models import build_model
from pipeline.stage_command import stage_command

REPO = Path(__file__).resolve().parents[1]
METRICS = ("R1", "R5", "R10", "mAP", "mINP")


def _run(project: Path, stage: str) -> float:
    start = time.perf_counter()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(stage_command(stage), cwd=project, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def run_seed(seed: int, workdir: Path) -> dict:
    project = workdir / f"seed{seed}"
    shutil.copytree(REPO / "pipeline", project / "pipeline")
    shutil.copytree(REPO / "stages", project / "stages")
    (project / "data").mkdir()
    os.symlink(REPO / "data" / "prepared", project / "data" / "prepared")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["seed"] = seed
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    train_s = _run(project, "train@baseline")
    eval_s = _run(project, "evaluate@baseline")
    result = json.loads((project / "metrics" / "baseline.json").read_text())
    training = json.loads((project / "metrics" / "train_baseline.json").read_text())
    return {"seed": seed, "train_s": train_s, "evaluate_s": eval_s, **{k: result[k] for k in METRICS},
            "best_epoch": training["best_epoch"], "pairs_per_s": training["pairs_per_s"],
            "data_wait_share": training["data_wait_share"]}


def random_init_metrics() -> dict:
    params = load_params(REPO / "params.yaml")
    prepared = REPO / "data" / "prepared"
    captions = (c for row in read_manifest(manifest_path(prepared, "train")) for c in row.captions)
    torch.manual_seed(0)
    model = build_model(params.model, (params.data.image_height, params.data.image_width), captions=captions)
    metrics, _ = evaluate_retrieval(model, load_retrieval_split(prepared, "test"), 256, torch.device("cpu"))
    return metrics


def summarise(runs: list[dict], floor: dict) -> dict:
    def mean_std(key):
        values = [r[key] for r in runs]
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    keys = (*METRICS, "train_s", "evaluate_s", "pairs_per_s", "data_wait_share")
    return {"date": date.today().isoformat(), "threads": torch.get_num_threads(), "runs": runs,
            "summary": {k: mean_std(k) for k in keys}, "random_init": floor}


def markdown(result: dict) -> str:
    s, floor = result["summary"], result["random_init"]
    head = "| model | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS)
    trained = "| baseline (mean ± std, %d seeds) | " % len(result["runs"]) + " | ".join(
        f"{s[k]['mean']:.2f} ± {s[k]['std']:.2f}" for k in METRICS) + " |"
    untrained = "| random init | " + " | ".join(f"{floor[k]:.2f}" for k in METRICS) + " |"
    timing = (f"train {s['train_s']['mean']:.0f} s + evaluate {s['evaluate_s']['mean']:.0f} s a seed; "
              f"{s['pairs_per_s']['mean']:.0f} pairs/s; data wait {100 * s['data_wait_share']['mean']:.1f}% of step time")
    return "\n".join([head, trained, untrained, "", timing])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "baseline.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        runs = []
        for seed in args.seeds:
            runs.append(run_seed(seed, Path(workdir)))
            print(json.dumps(runs[-1]), flush=True)
    result = summarise(runs, random_init_metrics())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
