"""Helpers the test modules share: a throw-away copy of the project with the tiny test profile (for
running real `dvc repro`), the tiny training and generator settings, the tiny configuration trained
as a stage or in a subprocess, and broken copies of the CUHK-PEDES excerpt."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.stage_command import stage_command  # noqa: F401  (the tests take it from here)
from pipeline.core.config import deep_merge  # noqa: F401  (the tests take it from here)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("TBPS_FIXTURES", REPO.parent / "shared" / "fixtures"))

# A dual encoder small enough to build in a test (random weights).
TINY_MODEL = {"width": 32, "layers": 1, "heads": 2, "patch_size": 8, "vocab_size": 200, "embed_dim": 32,
              "max_text_length": 32}

# Overrides of params.yaml that make every stage run in seconds.
TINY_PROFILE = {
    "data": {"shard_size": 16},
    "synth": {"num_train_ids": 16, "num_val_ids": 4, "num_test_ids": 6, "images_per_id": 2, "contact_sheet_ids": 3},
}

# A model and schedule small enough for a few seconds of CPU training (over TINY_PROFILE).
TINY_TRAINING = {
    "data": {"image_height": 32, "image_width": 16, "shard_size": 8},
    "model": {"width": 32, "layers": 1, "heads": 2, "patch_size": 8, "vocab_size": 200, "embed_dim": 32,
              "max_text_length": 32},
    "train": {"epochs": 2, "batch_size": 8, "checkpoint_every": 2, "num_workers": 0,
              "eval_batch_size": 16},
}

# params.yaml's generator section at toy size: 32x16 images, a few steps of each part.
TINY_GENERATOR_PARAMS = {
    "height": 32, "width": 16, "vae_channels": [8, 16], "vae_steps": 100, "vae_batch_size": 8,
    "vae_lr": 3e-3, "unet_channels": [16, 32], "unet_steps": 60, "unet_batch_size": 16, "unet_lr": 2e-3,
    "text_encoder": "clip", "text_width": 16, "text_layers": 1, "sample_steps": 3, "latent_channels": 4,
}


def require_fixture(path: Path) -> Path:
    """A file or folder of the shared fixtures: skipped where they are absent, a failure in CI
    (which always has them)."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"shared fixture {path} missing, and CI is set: CI must have ../shared/fixtures")
        pytest.skip(f"shared fixture {path} not found (set TBPS_FIXTURES to the fixtures folder)")
    return path


def make_tiny_project(dest: Path, overrides: dict | None = None, git: bool = False) -> Path:
    """Copy code, dvc.yaml and the tiny params into `dest` and initialise DVC there (in a git
    repository when `git`, as `dvc exp` needs one)."""
    for name in ("pipeline", "stages", "experiments"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", dest / "dvc.yaml")
    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_PROFILE)
    params = deep_merge(params, overrides or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if git:
        subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
        dvc(dest, "init", "-q")
    else:
        dvc(dest, "init", "--no-scm", "-q")
    dvc(dest, "config", "core.analytics", "false")
    return dest


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the venv's dvc in `project`, with the venv's python first on PATH (stage commands use it)."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([str(bin_dir / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result



def stale_stages(project: Path, *targets: str) -> dict:
    """`dvc status --json` of the project (or targets), less the `externals` stage: it is always
    run (it re-reads the folders params name), so DVC always lists it as "always changed"."""
    import json

    status = json.loads(dvc(project, "status", "--json", *targets).stdout or "{}")
    if status.get("externals") == ["always changed"]:
        del status["externals"]
    return status


def save_tiny_model(folder: Path, prepared: Path, seed: int = 0) -> None:
    """A random TINY_MODEL dual encoder (its tokenizer from `prepared`'s train captions) saved to `folder`."""
    import torch

    from pipeline.core.config import ModelConfig
    from pipeline.evaluation import load_retrieval_split
    from pipeline.models import build_model

    torch.manual_seed(seed)
    captions = load_retrieval_split(prepared, "train").captions
    model = build_model(ModelConfig(**TINY_MODEL), (64, 32), captions=captions)
    model.save_pretrained(folder)


def assert_calibrated(calibration: dict, most_pairs: int) -> None:
    """The filter's calibration is well formed: real pairs measured, ordered quantiles, and each
    threshold the quantile of its distribution at its level."""
    from pipeline.pdg.calibration import LEVELS

    assert 1 <= calibration["real_pairs"] <= most_pairs
    for name, threshold, level in (("preference", "margin_threshold", "margin_level"),
                                   ("similarity", "similarity_threshold", "similarity_level")):
        levels = [calibration[name][level] for level in LEVELS]  # the file's keys are sorted by name
        assert levels == sorted(levels) and all(np.isfinite(levels))
        assert calibration[name]["min"] <= calibration[threshold] <= calibration[name]["max"]
        if calibration[level] == 0.0:
            assert calibration[threshold] == calibration[name]["min"]
    assert 0.0 <= calibration["preferred_share"] <= 1.0


def fixed_calibration(margin: float, similarity: float):
    """A filter calibration whose thresholds are exactly `margin` and `similarity` (level 0 of one value each)."""
    from pipeline.pdg.calibration import Calibration

    return Calibration(np.array([margin]), np.array([similarity]), margin_level=0.0, similarity_level=0.0)


# --- the tiny configuration trained: as the train stage, in-process params, or in a subprocess ---


def training_params(**train):
    """TINY_PROFILE, then TINY_TRAINING, then `train` over its train section, as Params."""
    from pipeline.core.config import params_from_dict

    return params_from_dict(deep_merge(deep_merge(TINY_PROFILE, TINY_TRAINING), {"train": train}))


def training_project(dest: Path, overrides: dict | None = None) -> Path:
    """A tiny project with TINY_TRAINING (then `overrides`), its `prepare` stage run."""
    project = make_tiny_project(dest, deep_merge(TINY_TRAINING, overrides or {}))
    dvc(project, "repro", "prepare")
    return project


def _stage_env() -> dict:
    bin_dir = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}


def train_arguments() -> list[str]:
    """`stages.train` and its arguments for the baseline, as dvc.yaml gives them (after `python -m`)."""
    return stage_command("train@baseline")[2:]


def run_train_stage(project: Path, launcher=(sys.executable, "-m"), check: bool = True) -> subprocess.CompletedProcess:
    """The baseline's train stage run in `project` under `launcher` (by default `python -m`)."""
    result = subprocess.run([*launcher, *train_arguments()], cwd=project,
                            env=_stage_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def start_training_until(project: Path, launcher, step: int, **popen) -> subprocess.Popen:
    """The baseline's training started in the background, returned once its saved state reaches `step`
    (still running: for a test to kill it there)."""
    process = subprocess.Popen([*launcher, *train_arguments()], cwd=project, env=_stage_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    progress = project / "models" / "baseline" / "state" / "progress.json"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["global_step"] >= step:
            break
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be killed"
    return process


def training_progress(project: Path) -> dict:
    """The baseline's saved progress (state/progress.json) in a project."""
    return json.loads((project / "models" / "baseline" / "state" / "progress.json").read_text())


# Trains the tiny configuration: argv = prepared, out_dir, timing_file ("" for none), die_at. die_at
# "<folder name>:<n>" ends the process (os._exit, as a SIGKILL would) at the n-th swap of that folder,
# between its two renames (target -> old done, staging -> target not yet).
TRAINING_DRIVER = """
import logging, os, sys
from pathlib import Path
sys.path[:0] = [os.environ["STATE_TEST_CODE"], {tests!r}]
from pipeline.core.config import params_from_dict
from pipeline.optimization import make_accelerator
from pipeline.run_folder import RunFolder
from pipeline.training import Trainer
from tiny_project import TINY_PROFILE, TINY_TRAINING, deep_merge
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
prepared, out_dir, timing, die_at = sys.argv[1:5]
if die_at:
    folder, count = die_at.split(":")
    real_replace, seen = os.replace, [0]
    def replace(src, dst):
        if os.path.basename(str(src)) == "." + folder + ".staging":
            seen[0] += 1
            if seen[0] == int(count):
                os._exit(137)
        return real_replace(src, dst)
    os.replace = replace
params = params_from_dict(deep_merge(TINY_PROFILE, TINY_TRAINING))
accelerator = make_accelerator(params, cpu=True)
trainer = Trainer(params, prepared, RunFolder(Path(out_dir)), accelerator, timing_file=timing or None)
print(trainer.fit().global_step)
""".format(tests=str(REPO / "tests"))


class TrainingDriver:
    """Trainings of the tiny configuration on `prepared`, each in a subprocess with one thread (as the
    stage runs), so that every run, killed or not, computes with the same thread count, on `code`: a
    copy of pipeline/ and stages/ taken once (the fingerprint covers the code)."""

    def __init__(self, code: Path, prepared: Path):
        self.code, self.prepared = code, prepared

    def env(self) -> dict:
        return {**os.environ, "OMP_NUM_THREADS": "1", "STATE_TEST_CODE": str(self.code)}

    def run(self, out_dir: Path, timing: Path | None = None, die_at: str = "") -> subprocess.CompletedProcess:
        """A training into `out_dir`, ended at `die_at` if given (see TRAINING_DRIVER)."""
        argv = [str(self.prepared), str(out_dir), str(timing or ""), die_at]
        return subprocess.run([sys.executable, "-c", TRAINING_DRIVER, *argv], env=self.env(), capture_output=True,
                              text=True, timeout=600)

    def trained(self, out_dir: Path, **kwargs) -> subprocess.CompletedProcess:
        """run(), which must succeed."""
        result = self.run(out_dir, **kwargs)
        assert result.returncode == 0, result.stderr[-3000:]
        return result


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (its path relative to it) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_weights(ours: Path, theirs: Path) -> None:
    """Two run folders hold identical best/ and last/ weights."""
    import torch
    from safetensors.torch import load_file

    for which in ("best", "last"):
        a, b = load_file(ours / which / "model.safetensors"), load_file(theirs / which / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- broken copies of the CUHK-PEDES excerpt (tests/test_check_data.py, tests/test_bad_inputs.py) ---


def edit_annotations(root: Path, change) -> None:
    path = root / "reid_raw.json"
    entries = json.loads(path.read_text())
    change(entries)
    path.write_text(json.dumps(entries))


def delete_image(name):
    return lambda root: (root / "imgs/CUHK01" / name).unlink()


def truncate_image(name):
    def change(root: Path) -> None:
        path = root / "imgs/CUHK01" / name
        path.write_bytes(path.read_bytes()[:2000])

    return change


def convert_image(name, mode):
    def change(root: Path) -> None:
        from PIL import Image

        path = root / "imgs/CUHK01" / name
        with Image.open(path) as image:
            converted = image.convert(mode)
        converted.save(path)

    return change


def overwrite_image(name, payload):
    return lambda root: (root / "imgs/CUHK01" / name).write_bytes(payload)


def link_outside(name):
    """The image replaced by a symlink to a copy outside the data root."""
    def change(root: Path) -> None:
        path = root / "imgs/CUHK01" / name
        outside = root.parent / f"outside-{name}"
        outside.write_bytes(path.read_bytes())
        path.unlink()
        path.symlink_to(outside)

    return change


def edit_record(index, change):
    return lambda root: edit_annotations(root, lambda entries: change(entries[index], entries))


def set_fields(index, **fields):
    return edit_record(index, lambda record, _: record.update(fields))


# (how to break the copy, kind, where the line says it is); record i's image is in the fixture listing.
# A problem of an image file names the image; one of the annotation file names the record's image
# after its index, as the annotation file spells it (a 40,000-record file needs more than an index).
BREAKAGES = {
    "deleted image": (delete_image("0005003.png"), "missing-image", "imgs/CUHK01/0005003.png record 0"),
    "truncated png": (truncate_image("0022003.png"), "truncated-image", "imgs/CUHK01/0022003.png record 5"),
    "not an image": (overwrite_image("0010003.png", b"hello"), "unreadable-image", "imgs/CUHK01/0010003.png record 14"),
    "blank caption": (set_fields(20, captions=["a man", "  "]), "empty-caption", "reid_raw.json record 20 (CUHK01/0024001.png)"),
    "no captions": (set_fields(21, captions=[]), "empty-caption", "reid_raw.json record 21 (CUHK01/0024002.png)"),
    "missing field": (edit_record(4, lambda r, _: r.pop("captions")), "missing-field", "reid_raw.json record 4 (CUHK01/0022004.png)"),
    "id is a string": (set_fields(7, id="12990"), "wrong-type", "reid_raw.json record 7 (CUHK01/0022001.png)"),
    "captions not a list": (set_fields(3, captions="a man"), "wrong-type", "reid_raw.json record 3 (CUHK01/0005002.png)"),
    "duplicate path": (
        edit_record(30, lambda r, entries: r.update(file_path=entries[28]["file_path"])),
        "duplicate-path",
        "reid_raw.json record 30 (CUHK01/0027001.png)",
    ),
    "id in two splits": (set_fields(12, id=12555), "id-in-two-splits", "reid_raw.json record 12 (CUHK01/0010001.png)"),
    "path out of the root": (set_fields(6, file_path="../../outside/x.png"), "path-escapes-root",
                             "reid_raw.json record 6 (../../outside/x.png)"),
    "absolute path": (set_fields(8, file_path="/etc/hostname"), "path-escapes-root", "reid_raw.json record 8 (/etc/hostname)"),
    "symlink out of the root": (link_outside("0029002.png"), "path-escapes-root", "imgs/CUHK01/0029002.png record 10"),
    "the same image spelled with ./": (
        edit_record(26, lambda r, entries: r.update(file_path=entries[25]["file_path"].replace("/", "/./", 1))),
        "duplicate-path", "reid_raw.json record 26 (CUHK01/0026002.png)"),
    "id beyond 64 bits": (set_fields(9, id=2**70), "id-out-of-range", "reid_raw.json record 9 (CUHK01/0029003.png)"),
}


def project_params(overrides: dict | None = None) -> dict:
    raw = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_PROFILE)
    return deep_merge(raw, deep_merge({"model": TINY_MODEL, "train": {"eval_batch_size": 5}}, overrides or {}))


def make_search_project(root: Path, prepared: Path, overrides: dict | None = None) -> Path:
    """A project folder: data/prepared (the shared fixture, linked), a random tiny models/baseline/best,
    params.yaml; its index built as `index@baseline` would."""
    import torch

    from pipeline.core.config import params_from_dict
    from pipeline.search.build import IndexPaths, build_index

    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "prepared").symlink_to(prepared)
    save_tiny_model(root / "models" / "baseline" / "best", prepared)
    raw = project_params(overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    build_index(params_from_dict(raw), "baseline", torch.device("cpu"), IndexPaths.under(root, "baseline"))
    return root
