"""Training: resume after a kill, 1 vs 2 processes, non-finite losses, train and evaluate stages."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.core.config import params_from_dict
from pipeline.data.canonical import list_shards
from pipeline.data.loader import StreamPlan, build_shard_index, global_batches
from pipeline.data.prepare import prepare
from pipeline.optimization import make_accelerator
from pipeline.run_folder import RunFolder
from pipeline.training import NonFiniteLossError, Trainer
from tiny_project import TINY_PROFILE, deep_merge, dvc, make_tiny_project, stage_command

# A model and schedule small enough for a few seconds of CPU training.
TINY_TRAINING = {
    "data": {"image_height": 32, "image_width": 16, "shard_size": 8},
    "model": {"width": 32, "layers": 1, "heads": 2, "patch_size": 8, "vocab_size": 200, "embed_dim": 32,
              "max_text_length": 32},
    "train": {"epochs": 2, "batch_size": 8, "checkpoint_every": 2, "num_workers": 0,
              "eval_batch_size": 16},
}


def _project(tmp_path, overrides=None):
    project = make_tiny_project(tmp_path, deep_merge(TINY_TRAINING, overrides or {}))
    dvc(project, "repro", "prepare")
    return project


def _env(project):
    bin_dir = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}


def train_arguments() -> list[str]:
    """`stages.train` and its arguments for the baseline, as dvc.yaml gives them (after `python -m`)."""
    return stage_command("train@baseline")[2:]


def _train(project, launcher=(sys.executable, "-m"), check=True):
    result = subprocess.run([*launcher, *train_arguments()], cwd=project,
                            env=_env(project), capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def start_training_until(project, launcher, step: int, **popen) -> subprocess.Popen:
    """The baseline's training started in the background, returned once its saved state reaches `step`
    (still running: for a test to kill it there)."""
    process = subprocess.Popen([*launcher, *train_arguments()], cwd=project, env=_env(project),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    progress = project / "models" / "baseline" / "state" / "progress.json"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["global_step"] >= step:
            break
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be killed"
    return process


def _history(project):
    return json.loads((project / "models" / "baseline" / "state" / "progress.json").read_text())


def _weights(project, which="last"):
    return load_file(project / "models" / "baseline" / which / "model.safetensors")


def test_data_stream_is_split_exactly_across_processes(tmp_path):
    params = params_from_dict(deep_merge(TINY_PROFILE, TINY_TRAINING))
    prepare(params, tmp_path)
    index = build_shard_index(list_shards(tmp_path, "train"))
    whole = [[(p.key, p.caption) for p in batch] for _, batch in global_batches(StreamPlan(8, seed=1), index)]
    assert len(whole) == (16 * 2 * 2) // 8  # ids x images x captions / batch
    for rank in range(2):
        plan = StreamPlan(8, seed=1, rank=rank, world_size=2, start_step=3)
        for step, batch in global_batches(plan, index):
            assert [(p.key, p.caption) for p in batch] == whole[step]
    other_epoch = [[(p.key, p.caption) for p in b] for _, b in global_batches(StreamPlan(8, seed=1, epoch=1), index)]
    assert other_epoch != whole and sorted(sum(other_epoch, [])) == sorted(sum(whole, []))


@pytest.mark.slow  # a stage in a subprocess or several processes: seconds, not milliseconds
def test_training_learns_and_the_stages_write_their_outputs(tmp_path):
    project = _project(tmp_path, {"train": {"epochs": 8, "lr": 0.003}})
    dvc(project, "repro", "evaluate@baseline")
    history = _history(project)
    losses = [loss for _, loss in history["losses"]]
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.15  # the loss falls
    summary = json.loads((project / "metrics" / "train_baseline.json").read_text())
    assert summary["steps"] == 8 * 8 and 1 <= summary["best_epoch"] <= 8
    test = json.loads((project / "metrics" / "baseline.json").read_text())
    assert test["num_queries"] == 6 * 2 * 2 and test["num_gallery"] == 6 * 2
    assert test["R1"] <= test["R5"] <= test["R10"] and test["checkpoint_epoch"] == summary["best_epoch"]
    for png in ("reports/train/baseline/curves.png", "reports/evaluate/baseline/cmc.png",
                "reports/evaluate/baseline/retrievals.png"):
        assert (project / png).stat().st_size > 5000, png


def _model_files(project):
    files = sorted((project / "models" / "baseline").glob("*/model.safetensors"))
    return {str(f.relative_to(project)): (f.read_bytes(), f.stat().st_mtime_ns) for f in files}


def _set_train_params(project, **train):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(train)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow  # a stage in a subprocess or several processes: seconds, not milliseconds
def test_killed_run_resumes_to_the_same_result(tmp_path):
    straight = _project(tmp_path / "straight")
    _train(straight)
    # `accelerate launch -m stages.train`, then `dvc repro`: the finished run is done, not redone
    finished = _model_files(straight)
    assert {Path(name).parent.name for name in finished} == {"best", "last", "state"}
    again = _train(straight)
    assert "nothing to train" in again.stderr and "epoch 1/2" not in again.stderr
    assert _model_files(straight) == finished

    killed = _project(tmp_path / "killed")
    process = start_training_until(killed, (sys.executable, "-m"), step=6)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted_at = _history(killed)["global_step"]
    assert 6 <= interrupted_at < 16

    # settings that do not change the weights may change between the kill and the rerun
    _set_train_params(killed, num_workers=1, eval_batch_size=5, checkpoint_every=3)
    rerun = _train(killed)
    assert f"global step {interrupted_at})" in rerun.stderr and "starting afresh" not in rerun.stderr
    assert [loss for _, loss in _history(killed)["losses"]] == [loss for _, loss in _history(straight)["losses"]]
    for name, tensor in _weights(straight).items():
        assert torch.equal(tensor, _weights(killed)[name]), name


@pytest.mark.slow  # a stage in a subprocess or several processes: seconds, not milliseconds
def test_two_processes_follow_the_one_process_loss_trajectory(tmp_path):
    one = _project(tmp_path / "one")
    _train(one)
    two = _project(tmp_path / "two")
    torchrun = (str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m")
    _train(two, launcher=torchrun)
    single = [loss for _, loss in _history(one)["losses"]]
    double = [loss for _, loss in _history(two)["losses"]]
    assert len(single) == len(double) == 16
    assert max(abs(a - b) for a, b in zip(single, double)) < 1e-4, (single, double)
    assert _history(two)["epochs"][-1]["val_R1"] == pytest.approx(_history(one)["epochs"][-1]["val_R1"])


class _NanAtStep:
    """The real loss, except NaN at one global step."""

    def __init__(self, criterion, trainer, step):
        self.criterion, self.trainer, self.step = criterion, trainer, step

    def __call__(self, *args, **kwargs):
        loss = self.criterion(*args, **kwargs)
        return loss * float("nan") if self.trainer.progress.global_step == self.step else loss


def _trainer(prepared, out_dir, **train):
    params = params_from_dict(deep_merge(deep_merge(TINY_PROFILE, TINY_TRAINING), {"train": train}))
    trainer = Trainer(params, prepared, RunFolder(out_dir), make_accelerator(params, cpu=True))
    trainer.criterion = _NanAtStep(trainer.criterion, trainer, step=3)
    return trainer


def test_nonfinite_loss_stops_with_the_step_or_is_skipped(tmp_path):
    prepare(params_from_dict(deep_merge(TINY_PROFILE, TINY_TRAINING)), tmp_path / "prepared")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 0 step 3 \(global step 3\)"):
        _trainer(tmp_path / "prepared", tmp_path / "strict").fit()

    progress = _trainer(tmp_path / "prepared", tmp_path / "lenient", nonfinite_loss="skip").fit()
    assert progress.skipped_batches == 1 and progress.global_step == 16
    assert len(progress.losses) == 15 and all(math.isfinite(loss) for _, loss in progress.losses)
