"""The PDG gain and its ablation: test metrics of the dual encoder trained with and without
proximity data, per seed, with mean and standard deviation.

Every run happens in its own copy of the project, with the stage code exactly as `dvc repro`
runs it, reusing this checkout's outputs where the row does not change them (data/prepared,
models/baseline, models/generator, data/pdg/*). Rows:

  baseline       original pairs only (train@baseline)
  baseline-pdg-steps     baseline trained as many optimiser steps as pdg (more epochs: proximity
                 pairs lengthen pdg's epoch, so a gain must beat this row, not only `baseline`)
  pdg            original + filtered proximity pairs + approximate text + feature mixup (train@pdg)
  offline        proximity pairs only, no online PDG
  offline+text   proximity pairs + approximate text
  offline+mixup  proximity pairs + feature mixup
  filter-off     pdg, every generated pair kept (filter, caption rerun)
  probe-filter   pdg, keeping only pairs whose colour edit the attribute probe confirms
                 (filter.attribute_probe confirmed_only; filter, caption rerun)
  probe-reject-wrong     pdg without the pairs whose edit the probe reads wrong, the ones it
                 cannot read kept (attribute_probe reject_wrong): are wrong edits what costs?
  img2img        pdg with SDEdit instead of Prompt-to-Prompt (generate, filter, caption rerun)
  samples-1, samples-4   pdg with pdg.num_samples 1 / 4 (generate, filter, caption rerun)
  source-batch   pdg, each proximity pair in the batch of its source image (batch_with_source)
  text+source-batch      proximity pairs + approximate text, in the batch of their source
  text-only      approximate text on the original pairs, no proximity pairs (what the text alone gives)
  text-only-pdg-steps    text-only trained as many optimiser steps as pdg (what the pairs add over the
                 text is pdg minus this row)

Run from the repository root after `dvc repro`:

    python benchmarks/bench_pdg_gain.py --rows baseline pdg --seeds 0 1 2
    python benchmarks/bench_pdg_gain.py --rows offline offline+text offline+mixup filter-off img2img samples-1 samples-4 --seeds 0

and on machine B (benchmarks/results/pdg_gain_amx.json, docs/reproducibility.md), e.g.

    python benchmarks/bench_pdg_gain.py --rows probe-filter probe-reject-wrong text-only-pdg-steps --seeds 0 1 2 --out benchmarks/results/pdg_gain_amx.json

Scarce annotations (docs/results.md): after `dvc exp run -S synth.num_train_ids=150 -S train.epochs=40`,

    python benchmarks/bench_pdg_gain.py --rows baseline pdg baseline-pdg-steps offline offline+text offline+mixup text-only --seeds 0 1 2 --out benchmarks/results/pdg_gain_scarce.json

and with the default DAG's generator swapped in (docs/results.md gives the recipe),

    python benchmarks/bench_pdg_gain.py --rows pdg text-only-pdg-steps offline+text probe-filter probe-reject-wrong --seeds 0 1 2 --out benchmarks/results/pdg_gain_scarce_default_generator.json

or with a generator that also learned from 450 identities no encoder sees, after
`dvc exp run -S synth.num_train_ids=150 -S train.epochs=40 -S synth.num_generator_ids=450`,

    python benchmarks/bench_pdg_gain.py --rows pdg --seeds 0 1 2 --out benchmarks/results/pdg_gain_scarce_generator_pool.json

`--out FILE` records elsewhere (the replication on a second machine went to
benchmarks/results/pdg_gain_amx.json; every run records the machine it ran on);
`--workdir DIR` keeps each run's project (models included) in DIR/<row>-seed<N>.

Results accumulate in benchmarks/results/pdg_gain.json (a rerun replaces only its rows and
seeds; proximity rows made with another generator, by dvc.lock's md5 of models/generator, are
dropped); a Markdown table of everything recorded so far is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import yaml

from pipeline.config import ConfigError, Params, params_from_dict
from pipeline.data.canonical import manifest_path, read_manifest
from pipeline.io import write_json_atomic
from pipeline.training import steps_per_epoch

REPO = Path(__file__).resolve().parents[1]
METRICS = ("R1", "R5", "R10", "mAP", "mINP")
NO_TEXT = {"text_prob": 0.0}
NO_MIXUP = {"mixup_prob": 0.0}
SOURCE_BATCH = {"variants": {"pdg": {"batch_with_source": True}}}
ROWS: dict[str, dict] = {
    # params overrides, stages to rerun before training (their outputs are not linked in)
    "baseline": {"variant": "baseline"},
    # as many optimiser steps as samples-4 (13 x 75 = 975 against 10 x 95 = 950)
    "baseline-13-epochs": {"variant": "baseline", "params": {"train": {"epochs": 13}}},
    "baseline-pdg-steps": {"variant": "baseline", "epochs_matching": "pdg"},
    "pdg": {"variant": "pdg"},
    "offline": {"variant": "pdg", "online": {**NO_TEXT, **NO_MIXUP}},
    "offline+text": {"variant": "pdg", "online": NO_MIXUP},
    "offline+mixup": {"variant": "pdg", "online": NO_TEXT},
    "filter-off": {"variant": "pdg", "params": {"filter": {"enabled": False}}, "stages": ["filter", "caption"]},
    "probe-filter": {"variant": "pdg", "params": {"filter": {"attribute_probe": "confirmed_only"}},
                     "stages": ["filter", "caption"]},
    "probe-reject-wrong": {"variant": "pdg", "params": {"filter": {"attribute_probe": "reject_wrong"}},
                           "stages": ["filter", "caption"]},
    "img2img": {"variant": "pdg", "params": {"pdg": {"method": "img2img"}}, "stages": ["generate", "filter", "caption"]},
    "samples-1": {"variant": "pdg", "params": {"pdg": {"num_samples": 1}}, "stages": ["generate", "filter", "caption"]},
    "samples-4": {"variant": "pdg", "params": {"pdg": {"num_samples": 4}}, "stages": ["generate", "filter", "caption"]},
    "source-batch": {"variant": "pdg", "params": SOURCE_BATCH},
    "text+source-batch": {"variant": "pdg", "online": NO_MIXUP, "params": SOURCE_BATCH},
    "text-only": {"variant": "pdg", "online": NO_MIXUP, "params": {"variants": {"pdg": {"data": "data/prepared"}}}},
    "text-only-pdg-steps": {"variant": "pdg", "online": NO_MIXUP, "epochs_matching": "pdg",
                            "params": {"variants": {"pdg": {"data": "data/prepared"}}}},
}
# what each stage writes: not linked from this checkout when the row reruns the stage
STAGE_OUTPUTS = {"generate": "data/pdg/raw", "filter": "data/pdg/filtered", "caption": "data/pdg/train"}
LINKED = ("data/prepared", "data/pdg/raw", "data/pdg/filtered", "data/pdg/train", "models/generator", "models/probe")


def _deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _deep_merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def _run(project: Path, *command: str) -> float:
    start = time.perf_counter()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", *command], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed in {project}:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def make_project(row: str, seed: int, workdir: Path) -> Path:
    spec = ROWS[row]
    project = workdir / f"{row}-seed{seed}"
    shutil.rmtree(project, ignore_errors=True)  # a kept project of an earlier run
    shutil.copytree(REPO / "pipeline", project / "pipeline")
    shutil.copytree(REPO / "stages", project / "stages")
    rerun = {STAGE_OUTPUTS[s] for s in spec.get("stages", [])}
    for relative in LINKED:
        if relative not in rerun and (REPO / relative).exists():
            (project / relative).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(REPO / relative, project / relative)
    if spec["variant"] != "baseline":  # the filter scores with the baseline of `dvc repro`, whatever the seed
        (project / "models").mkdir(exist_ok=True)
        os.symlink(REPO / "models" / "baseline", project / "models" / "baseline")
    checkout_params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = _deep_merge(copy.deepcopy(checkout_params), spec.get("params", {}))  # the row's edits stay its own
    params["train"]["seed"] = seed
    if "online" in spec:
        params["variants"]["pdg"]["online"] = {**params["variants"]["pdg"].get("online", {}), **spec["online"]}
    if "epochs_matching" in spec:
        params["train"]["epochs"] = epochs_matching_steps(checkout_params, spec["epochs_matching"],
                                                          params, spec["variant"])
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def epochs_matching_steps(checkout_params: dict, target: str, row_params: dict, row_variant: str) -> int:
    """Epochs of `row_variant` (under the row's params) giving the optimiser steps that `target`
    takes in the checkout's train.epochs (nearest). The params are read as the stages read them
    (defaults, checks), and the steps counted by the trainer's own function, so the match is exact."""
    try:
        checkout, row = params_from_dict(checkout_params), params_from_dict(row_params)
        target_steps = checkout.train.epochs * _steps_per_epoch(checkout, target)
        row_steps = _steps_per_epoch(row, row_variant)
    except ConfigError as error:
        raise SystemExit(f"error: {error}")
    return round(target_steps / row_steps)


def _steps_per_epoch(params: Params, variant: str) -> int:
    manifest = manifest_path(REPO / params.variant(variant).data, "train")
    if not manifest.is_file():
        raise SystemExit(f"{manifest} is missing: run `dvc repro` first")
    return steps_per_epoch(read_manifest(manifest), params.train.batch_size)


def machine() -> dict:
    """The CPU the runs were made on: float results differ between CPU kernel families
    (same seed, same code), so a recorded table is only reproduced on a like machine."""
    import torch

    flags = model = ""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = line.partition(":")
        model = model or (value.strip() if key.strip() == "model name" else "")
        flags = flags or (value if key.strip() == "flags" else "")
    return {"cpu": model or platform.processor(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "amx": "amx_tile" in flags.split(), "torch": torch.__version__}


def generator_fingerprint() -> str:
    """The md5 that dvc.lock records for models/generator: proximity rows made with another
    generator are not averaged with the current ones."""
    lock_path = REPO / "dvc.lock"
    lock = yaml.safe_load(lock_path.read_text()) if lock_path.is_file() else {}
    outs = lock.get("stages", {}).get("train_generator", {}).get("outs", [])
    md5 = next((out["md5"] for out in outs if out["path"] == "models/generator"), None)
    if md5 is None:
        raise SystemExit(f"{lock_path} records no models/generator: run `dvc repro` first")
    return md5


def current_runs(recorded: list[dict], fingerprint: str) -> list[dict]:
    """The recorded runs still valid: baseline runs, and proximity runs of this generator."""
    kept = [r for r in recorded if ROWS[r["row"]]["variant"] == "baseline" or r.get("generator") == fingerprint]
    if len(kept) < len(recorded):
        print(f"dropping {len(recorded) - len(kept)} recorded run(s) made with another generator", flush=True)
    return kept


def run(row: str, seed: int, workdir: Path, generator: str) -> dict:
    spec = ROWS[row]
    project = make_project(row, seed, workdir)
    seconds = {}
    for stage in spec.get("stages", []):
        seconds[stage] = _run(project, f"stages.{stage}")
    variant = spec["variant"]
    seconds["train"] = _run(project, "stages.train", "--variant", variant)
    seconds["evaluate"] = _run(project, "stages.evaluate", "--variant", variant)
    metrics = json.loads((project / "metrics" / f"{variant}.json").read_text())
    training = json.loads((project / "metrics" / f"train_{variant}.json").read_text())
    extra = {}
    for name in ("filter", "caption", "generate"):
        path = project / "metrics" / f"{name}.json"
        if path.is_file():
            extra[name] = json.loads(path.read_text())
    made_with = {"generator": generator} if variant == "pdg" else {}
    return {"row": row, "seed": seed, **made_with, **{k: metrics[k] for k in METRICS}, "best_epoch": training["best_epoch"],
            "best_val_R1": training["best_val_R1"], "steps": training["steps"], "seconds": seconds, **extra}


def summary(runs: list[dict]) -> dict:
    rows = {}
    for name in ROWS:
        mine = [r for r in runs if r["row"] == name]
        if not mine:
            continue
        rows[name] = {"seeds": sorted(r["seed"] for r in mine)}
        for key in (*METRICS, "best_val_R1"):
            values = [r[key] for r in mine]
            rows[name][key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return rows


def markdown(rows: dict) -> str:
    lines = ["| row | seeds | test R1 | R5 | R10 | mAP | mINP | val R1 |", "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        cells = [f"{row[k]['mean']:.2f} ± {row[k]['std']:.2f}" if len(row["seeds"]) > 1 else f"{row[k]['mean']:.2f}"
                 for k in (*METRICS, "best_val_R1")]
        lines.append(f"| {name} | {', '.join(map(str, row['seeds']))} | " + " | ".join(cells) + " |")
    if "baseline" in rows and "pdg" in rows:
        gain = rows["pdg"]["R1"]["mean"] - rows["baseline"]["R1"]["mean"]
        lines.append(f"\nPDG gain, test R1: {gain:+.2f} points")
    return "\n".join(lines)


def recorded_runs(out: Path) -> list[dict]:
    """The runs an earlier invocation wrote to --out; checked before any hour-long run starts."""
    if not out.is_file():
        return []
    try:
        runs = json.loads(out.read_text())["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise SystemExit(f"--out {out}: not a results file of this benchmark (no readable 'runs': {error!r})")
    if not isinstance(runs, list) or not all(isinstance(r, dict) and {"row", "seed"} <= r.keys() for r in runs):
        raise SystemExit(f"--out {out}: 'runs' must be a list of records with 'row' and 'seed'")
    unknown = sorted({str(r["row"]) for r in runs} - ROWS.keys())
    if unknown:
        raise SystemExit(f"--out {out}: runs of unknown rows {unknown} (rows: {', '.join(ROWS)})")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["baseline", "pdg"], choices=list(ROWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pdg_gain.json"))
    parser.add_argument("--workdir", help="keep each run's project here (default: a temporary folder)")
    args = parser.parse_args()
    out = Path(args.out)
    generator = generator_fingerprint()  # read once: every run of this invocation uses this generator
    host = machine()
    recorded = current_runs(recorded_runs(out), generator)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or scratch
        for row in args.rows:
            for seed in args.seeds:
                result = {**run(row, seed, Path(workdir), generator), "machine": host}
                recorded = [r for r in recorded if (r["row"], r["seed"]) != (row, seed)] + [result]
                report = {"date": date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
                          "runs": recorded, "summary": summary(recorded)}
                write_json_atomic(out, report)  # after every run: a stopped benchmark keeps what it measured
                print(json.dumps({k: result[k] for k in ("row", "seed", *METRICS, "best_val_R1")}), flush=True)
    print(markdown(summary(recorded)))


if __name__ == "__main__":
    main()
