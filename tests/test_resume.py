"""A training's saved state: a killed run resumes to the same result (in one process or two), a
finished run is done and not trained again, the fingerprint decides what may resume, a pulled state
runs no code, a broken or unfitting state is named, and a retrain writes the same bytes.

The state tests train in subprocesses (conftest.py's training_driver: one thread each, as the stage
does), so that every run, killed or not, computes with the same thread count, on a copy of the code
taken once (the fingerprint covers it)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.data.canonical import list_shards
from pipeline.data.prepare import prepare
from pipeline.optimization import make_accelerator
from pipeline.run_folder import RunFolder
from pipeline.training import Trainer, training_fingerprint
from tiny_project import (assert_same_weights, folder_files, run_train_stage, start_training_until, training_params,
                          training_progress, training_project)


# --- a killed stage resumes to the same result ---


def _model_files(project):
    files = sorted((project / "models" / "baseline").glob("*/model.safetensors"))
    return {str(f.relative_to(project)): (f.read_bytes(), f.stat().st_mtime_ns) for f in files}


def _set_train_params(project, **train):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(train)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _weights(project, which="last"):
    return load_file(project / "models" / "baseline" / which / "model.safetensors")


@pytest.mark.slow  # a stage in a subprocess or several processes: seconds, not milliseconds
def test_killed_run_resumes_to_the_same_result(tmp_path):
    straight = training_project(tmp_path / "straight")
    run_train_stage(straight)
    # `accelerate launch -m stages.train`, then `dvc repro`: the finished run is done, not redone
    finished = _model_files(straight)
    assert {Path(name).parent.name for name in finished} == {"best", "last", "state"}
    again = run_train_stage(straight)
    assert "nothing to train" in again.stderr and "epoch 1/2" not in again.stderr
    assert _model_files(straight) == finished

    killed = training_project(tmp_path / "killed")
    process = start_training_until(killed, (sys.executable, "-m"), step=6)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted_at = training_progress(killed)["global_step"]
    assert 6 <= interrupted_at < 16

    # settings that do not change the weights may change between the kill and the rerun
    _set_train_params(killed, num_workers=1, eval_batch_size=5, checkpoint_every=3)
    rerun = run_train_stage(killed)
    assert f"global step {interrupted_at})" in rerun.stderr and "starting afresh" not in rerun.stderr
    losses = [loss for _, loss in training_progress(straight)["losses"]]
    assert [loss for _, loss in training_progress(killed)["losses"]] == losses
    for name, tensor in _weights(straight).items():
        assert torch.equal(tensor, _weights(killed)[name]), name


@pytest.mark.slow  # three 2-process trainings
def test_two_processes_killed_resume_to_the_same_weights(tmp_path):
    torchrun = (str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m")
    straight_project, killed = training_project(tmp_path / "straight"), training_project(tmp_path / "killed")
    run_train_stage(straight_project, launcher=torchrun)
    process = start_training_until(killed, torchrun, step=6)
    import psutil

    workers = psutil.Process(process.pid).children(recursive=True)  # in sessions of their own
    for victim in [process, *workers]:
        os.kill(victim.pid, signal.SIGKILL)
    process.wait()
    psutil.wait_procs(workers, timeout=30)
    assert {"rng-0.json", "rng-1.json"} <= {p.name for p in (killed / "models/baseline/state").iterdir()}
    rerun = run_train_stage(killed, launcher=torchrun)
    assert "resumed at" in rerun.stderr and "starting afresh" not in rerun.stderr
    assert_same_weights(killed / "models" / "baseline", straight_project / "models" / "baseline")


# --- in one process: a finished run is done, run-only keys keep the fingerprint ---


def _trainer(prepared: Path, out_dir: Path, **train) -> Trainer:
    params = training_params(**train)
    return Trainer(params, prepared, RunFolder(out_dir), make_accelerator(params, cpu=True))


def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _outputs(out_dir: Path) -> dict:
    files = [p for p in sorted(out_dir.rglob("*")) if p.is_file()]
    return {str(p.relative_to(out_dir)): _digest(p) for p in files}


class _Interrupted(Exception):
    pass


def _no_training(*args, **kwargs):
    raise AssertionError("a finished run trained again")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    prepare(training_params(), root / "prepared")
    progress = _trainer(root / "prepared", root / "run").fit()
    return root, progress


def test_a_finished_run_is_done_not_trained_again(straight_run, tmp_path, monkeypatch):
    root, progress = straight_run
    assert progress.epoch == 2 and progress.global_step == 16
    before = _outputs(root / "run")
    assert {"best/model.safetensors", "last/model.safetensors", "state/progress.json"} <= set(before)
    last_weights = load_file(root / "run" / "last" / "model.safetensors")

    monkeypatch.setattr(Trainer, "_step", _no_training)
    monkeypatch.setattr(Trainer, "_validate", _no_training)
    again = _trainer(root / "prepared", root / "run").fit()
    assert again == progress
    assert _outputs(root / "run") == before  # not one file rewritten (contents and mtimes)

    # last/ gone (e.g. deleted by hand): written from the saved state, best/ left alone
    shutil.rmtree(root / "run" / "last")
    again = _trainer(root / "prepared", root / "run").fit()
    assert again == progress
    rewritten = load_file(root / "run" / "last" / "model.safetensors")
    assert rewritten.keys() == last_weights.keys()
    assert all(torch.equal(rewritten[k], last_weights[k]) for k in last_weights)
    after = _outputs(root / "run")
    assert {k: v for k, v in after.items() if not k.startswith("last/")} == {
        k: v for k, v in before.items() if not k.startswith("last/")
    }


def test_run_only_keys_leave_the_fingerprint_and_a_killed_run_resumes(straight_run, tmp_path, monkeypatch):
    root, straight = straight_run
    shards = list_shards(root / "prepared", "train")
    base = training_fingerprint(training_params(), shards)
    assert training_fingerprint(training_params(num_workers=3, eval_batch_size=5, checkpoint_every=7,
                                                launcher="torchrun --standalone --nproc_per_node 2"), shards) == base
    for changed in ({"batch_size": 4}, {"lr": 1e-3}, {"head_lr": 1e-3}, {"epochs": 3}, {"seed": 1}):
        assert training_fingerprint(training_params(**changed), shards) != base, changed

    real_step = Trainer._step

    def step_until_killed(self, batch):
        if self.progress.global_step == 5:  # the state of step 4 is saved (checkpoint_every 2)
            raise _Interrupted
        return real_step(self, batch)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_step", step_until_killed)
        with pytest.raises(_Interrupted):
            _trainer(root / "prepared", tmp_path / "run").fit()

    resumed = _trainer(root / "prepared", tmp_path / "run", num_workers=1, eval_batch_size=4, checkpoint_every=3)
    assert resumed.resume_if_possible() and resumed.progress.global_step == 4  # resumed, not afresh
    progress = resumed.fit()
    assert [loss for _, loss in progress.losses] == [loss for _, loss in straight.losses]
    ours, theirs = load_file(tmp_path / "run/last/model.safetensors"), load_file(root / "run/last/model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_the_fingerprint_sees_same_size_edits_not_the_thread_count(tmp_path, monkeypatch):
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"a red jacket" + bytes(100))
    base = training_fingerprint(training_params(), [shard])
    shard.write_bytes(b"a tan jacket" + bytes(100))  # the same size: a caption edited in place
    edited = training_fingerprint(training_params(), [shard])
    assert edited != base
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)  # how a run is executed: not its configuration
    assert training_fingerprint(training_params(), [shard]) == edited


# --- no wall-clock figure inside models/ ---


@pytest.mark.slow  # a subprocess (a fresh interpreter importing torch): the slow tier
def test_two_trainings_write_byte_identical_outputs(training_driver, straight_training, tmp_path):
    training_driver.trained(tmp_path / "again", timing=tmp_path / "timing.json")
    ours, theirs = folder_files(tmp_path / "again"), folder_files(straight_training)
    assert sorted(ours) == sorted(theirs)
    assert {"state/progress.json", "state/model.safetensors", "state/optimizer.safetensors", "state/rng-0.json",
            "best/model.safetensors", "last/model.safetensors"} <= set(ours)
    assert [name for name in ours if ours[name] != theirs[name]] == []
    assert not [name for name in ours if name.endswith((".pkl", ".bin", ".pt"))]
    progress = json.loads(ours["state/progress.json"])
    assert progress["global_step"] == 16 and {"epoch", "train_loss", "val_R1"} <= set(progress["epochs"][0])
    assert not any("pairs_per_s" in e or "data_wait_share" in e for e in progress["epochs"])
    timing = json.loads((tmp_path / "timing.json").read_text())  # the clock's figures are kept, outside models/
    assert [t["epoch"] for t in timing] == [1, 2] and all(t["pairs_per_s"] > 0 for t in timing)
    assert all(0 <= t["data_wait_share"] <= 1 for t in timing)


# --- no code from a pulled state; a broken, unfitting or foreign state ---


class _Payload:
    """Unpickling it writes the marker file: proof that the file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


PLANTED = ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "pytorch_model.bin",
           "scaler.pt", "rng-0.pkl", "model.pkl")


@pytest.mark.slow  # a subprocess (a fresh interpreter importing torch): the slow tier
def test_a_pickle_planted_in_the_state_never_runs(training_driver, straight_training, tmp_path):
    marker = tmp_path / "marker"
    payload = tmp_path / "payload.pkl"
    torch.save({"state": _Payload(marker)}, payload)
    torch.load(payload, weights_only=False)  # the payload is live: loading it the way Accelerate did runs it
    assert marker.read_text() == "payload ran"
    marker.unlink()

    run = tmp_path / "run"
    killed = training_driver.run(run, die_at="best:1")  # after the state of step 8 (epoch 1 of 2)
    assert killed.returncode == 137
    for name in PLANTED:
        shutil.copy(payload, run / "state" / name)
    resumed = training_driver.trained(run)
    assert "global step 8)" in resumed.stderr and "starting afresh" not in resumed.stderr
    assert "ignoring custom_checkpoint_0.pkl, model.pkl, optimizer.bin" in resumed.stderr
    assert not marker.exists()
    assert_same_weights(run, straight_training)

    # a finished state with the payload: done, still nothing unpickled
    for name in PLANTED:
        shutil.copy(payload, run / "state" / name)
    again = training_driver.trained(run)
    assert "nothing to train" in again.stderr and not marker.exists()


@pytest.mark.slow  # two more trainings
def test_a_broken_state_file_is_named_and_the_run_starts_afresh(training_driver, straight_training, tmp_path):
    run = tmp_path / "run"
    assert training_driver.run(run, die_at="best:1").returncode == 137
    (run / "state" / "optimizer.safetensors").write_bytes(b"not safetensors")
    rerun = training_driver.trained(run)
    warnings = [line for line in rerun.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and f"{run}/state/optimizer.safetensors: not a readable safetensors file" in warnings[0]
    assert warnings[0].endswith("starting afresh") and "resumed at" not in rerun.stderr
    assert_same_weights(run, straight_training)


def test_a_state_that_does_not_fit_the_run_is_one_error_naming_the_file(training_driver, straight_training, tmp_path):
    from pipeline.checkpointing import StateError, apply_training_state, read_training_state

    params = training_params()
    trainer = Trainer(params, training_driver.prepared, RunFolder(tmp_path / "run"), make_accelerator(params, cpu=True))
    state = shutil.copytree(straight_training / "state", tmp_path / "state")
    saved = read_training_state(state, trainer.accelerator)
    apply_training_state(saved, trainer.accelerator, trainer.model, trainer.optimizer, trainer.scheduler)
    assert trainer.scheduler.last_epoch == 16 and trainer.optimizer.state_dict()["state"][0]["step"].item() == 16

    optimizer = json.loads((state / "optimizer.json").read_text())
    optimizer["param_groups"].pop()
    (state / "optimizer.json").write_text(json.dumps(optimizer))
    with pytest.raises(StateError, match=rf"^{state}/optimizer.json: does not fit this run \(.*parameter groups"):
        apply_training_state(read_training_state(state, trainer.accelerator), trainer.accelerator, trainer.model,
                             trainer.optimizer, trainer.scheduler)


@pytest.mark.slow  # one more training
def test_a_fresh_run_replaces_best_and_last_of_the_previous_configuration(training_driver, straight_training, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight_training, run)
    fingerprint = json.loads((straight_training / "last" / "training.json").read_text())["fingerprint"]
    for path in (run / "state" / "progress.json", run / "best" / "training.json", run / "last" / "training.json"):
        saved = json.loads(path.read_text())
        path.write_text(json.dumps({**saved, "fingerprint": "another-configuration"}))
    result = training_driver.trained(run)
    assert "from another configuration: starting afresh" in result.stderr
    for which in ("best", "last"):
        assert json.loads((run / which / "training.json").read_text())["fingerprint"] == fingerprint, which
    assert_same_weights(run, straight_training)
