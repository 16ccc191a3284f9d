"""Process-level set-up shared by the stage entry points."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.core import hub
from pipeline.core.config import ConfigError, Params, load_params
from pipeline.core.distributed import rank_from_env, refuse_launcher, world_size_from_env
from pipeline.core.io import BrokenArtifact
from pipeline.core.profile import check_stage_inputs


def setup_logging(level: int = logging.INFO) -> None:
    """Timestamped lines; under a launcher each names its process (`[rank 3]`), so a failing rank says which."""
    rank = f"[rank {rank_from_env()}] " if world_size_from_env() > 1 else ""
    logging.basicConfig(level=level, format=f"%(asctime)s {rank}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def start_stage(
    stage: str, description: str, with_variant: bool = False, paths: Sequence[str] = (), launcher: bool = False
) -> tuple[argparse.Namespace, Params]:
    """Start stage `stage`: parse the arguments, set up logging and load the params.

    `stage` is its name in dvc.yaml. pipeline/core/profile.py's STAGE_INPUTS lists its external
    inputs. A bad params file, or a variant that params.yaml does not define, exits with status 1.
    So does a stage that runs in one process (not `launcher`) when it was started under a launcher
    (pipeline/core/distributed.py).

    `paths` name what the stage reads and writes. Each is a required `--<name>` argument (a Path),
    given on the stage's command line in dvc.yaml beside its deps and outs. So a path is written
    once, where DVC tracks it."""
    args = _stage_arguments(description, with_variant, paths)
    setup_logging()
    sys.excepthook = _broken_artifact_hook
    refusal = None if launcher else refuse_launcher(stage)
    if refusal:
        if rank_from_env() == 0:
            logging.getLogger("stages").error("%s", refusal)
        raise SystemExit(1)
    try:
        params = load_params(args.params)
        if with_variant:
            params.variant(args.variant)
        hub.configure(params.hub)
        check_stage_inputs(params, stage)
        return args, params
    except ConfigError as err:
        for line in str(err).splitlines():
            logging.getLogger("stages").error("%s", line)
        raise SystemExit(1) from None


def _broken_artifact_hook(kind, error, trace) -> None:
    """A BrokenArtifact ends a stage with its one line (the file, the stage that makes it) and exit 1;
    anything else is a bug, shown with its traceback."""
    if issubclass(kind, BrokenArtifact):
        text = str(error)
        if "Original Traceback" in text:  # raised in a DataLoader worker: torch wraps it in the traceback
            text = " ".join(text.rsplit(f"{kind.__name__}: ", 1)[-1].split())
        logging.getLogger("stages").error("%s", text)  # the interpreter then exits with status 1
        return
    sys.__excepthook__(kind, error, trace)


def _stage_arguments(description: str, with_variant: bool, paths: Sequence[str]) -> argparse.Namespace:
    """Parse the arguments every stage takes (where params live; the variant, for variant stages)
    and the stage's own paths."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    if with_variant:
        parser.add_argument("--variant", required=True, help="a name under 'variants' in params.yaml")
    for name in paths:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=True, metavar="PATH")
    return parser.parse_args()


def machine() -> dict:
    """Where a result was computed: the CPU model, the instruction set torch's kernels use (plus AMX),
    the accelerator if one was used, and torch's version. Floating-point sums run in another order
    on another CPU family, so the same seed gives other figures there."""
    import platform

    model, flags = "", []
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = value.split()
    isa = torch.backends.cpu.get_cpu_capability().lower() + ("+amx" if "amx_tile" in flags else "")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return {"cpu": model or platform.processor() or "unknown", "isa": isa, "gpu": gpu, "torch": torch.__version__}


TIMING_KEYS = ("seconds", "_seconds", "_per_s", "_per_second", "hours_at_measured_rate")


def split_timing(results: dict) -> tuple[dict, dict]:
    """(metrics, timing): a stage's results without, and with only, its durations and rates.

    Durations and rates are keys named `seconds` or ending in one of TIMING_KEYS, at any depth.
    Timings differ between machines and runs of the same code. So they go to a timing file beside the
    metrics, and `dvc metrics diff` shows only what changed in quality."""
    metrics, timing = {}, {}
    for key, value in results.items():
        if key.endswith(TIMING_KEYS):
            timing[key] = value
        elif isinstance(value, dict):
            inner, inner_timing = split_timing(value)
            metrics[key] = inner
            if inner_timing:
                timing[key] = inner_timing
        else:
            metrics[key] = value
    return metrics, timing
