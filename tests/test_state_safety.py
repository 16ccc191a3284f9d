"""A pulled training state runs no code, folder swaps survive a kill, and a retrain writes the same bytes.

Trainings run in subprocesses (one thread each, as the stage does), so that every run, killed or not,
computes with the same thread count, on a copy of the code taken once (the fingerprint covers it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.config import params_from_dict
from pipeline.data.prepare import prepare
from pipeline.core.io import old_path, recover_directory, replace_directory, staging_path, writing_directory
from test_training import TINY_TRAINING
from tiny_project import TINY_PROFILE, deep_merge

REPO = Path(__file__).resolve().parents[1]

# Trains the tiny configuration: argv = prepared, out_dir, timing_file ("" for none), die_at. die_at
# "<folder name>:<n>" ends the process (os._exit, as a SIGKILL would) at the n-th swap of that folder,
# between its two renames (target -> old done, staging -> target not yet).
DRIVER = """
import logging, os, sys
from pathlib import Path
sys.path[:0] = [os.environ["STATE_TEST_CODE"], {tests!r}]
from pipeline.core.config import params_from_dict
from pipeline.optimization import make_accelerator
from pipeline.run_folder import RunFolder
from pipeline.training import Trainer
from test_training import TINY_TRAINING
from tiny_project import TINY_PROFILE, deep_merge
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
trainer = Trainer(params, prepared, RunFolder(Path(out_dir)), make_accelerator(params, cpu=True), timing_file=timing or None)
print(trainer.fit().global_step)
""".format(tests=str(REPO / "tests"))


CODE: Path | None = None  # the module's copy of pipeline/ and stages/


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "STATE_TEST_CODE": str(CODE)}


def _train(prepared: Path, out_dir: Path, timing: Path | None = None, die_at: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, str(prepared), str(out_dir), str(timing or ""), die_at],
                          env=_env(), capture_output=True, text=True, timeout=600)


def _trained(prepared: Path, out_dir: Path, **kwargs) -> subprocess.CompletedProcess:
    result = _train(prepared, out_dir, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_same_weights(ours: Path, theirs: Path) -> None:
    for which in ("best", "last"):
        a, b = load_file(ours / which / "model.safetensors"), load_file(theirs / which / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    global CODE
    CODE = tmp_path_factory.mktemp("code")
    for package in ("pipeline", "stages"):
        shutil.copytree(REPO / package, CODE / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("state") / "prepared"
    prepare(params_from_dict(deep_merge(TINY_PROFILE, TINY_TRAINING)), out)
    return out


@pytest.fixture(scope="module")
def straight(prepared) -> Path:
    out = prepared.parent / "straight"
    _trained(prepared, out, timing=prepared.parent / "straight-timing.json")
    return out


# --- no wall-clock figure inside models/ ---


def test_two_trainings_write_byte_identical_outputs(prepared, straight, tmp_path):
    _trained(prepared, tmp_path / "again", timing=tmp_path / "timing.json")
    ours, theirs = _files(tmp_path / "again"), _files(straight)
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


# --- no code from a pulled state ---


class _Payload:
    """Unpickling it writes the marker file: proof that the file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


PLANTED = ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "pytorch_model.bin",
           "scaler.pt", "rng-0.pkl", "model.pkl")


def test_a_pickle_planted_in_the_state_never_runs(prepared, straight, tmp_path):
    marker = tmp_path / "marker"
    payload = tmp_path / "payload.pkl"
    torch.save({"state": _Payload(marker)}, payload)
    torch.load(payload, weights_only=False)  # the payload is live: loading it the way Accelerate did runs it
    assert marker.read_text() == "payload ran"
    marker.unlink()

    run = tmp_path / "run"
    killed = _train(prepared, run, die_at="best:1")  # after the state of step 8 (epoch 1 of 2)
    assert killed.returncode == 137
    for name in PLANTED:
        shutil.copy(payload, run / "state" / name)
    resumed = _trained(prepared, run)
    assert "global step 8)" in resumed.stderr and "starting afresh" not in resumed.stderr
    assert "ignoring custom_checkpoint_0.pkl, model.pkl, optimizer.bin" in resumed.stderr
    assert not marker.exists()
    _assert_same_weights(run, straight)

    # a finished state with the payload: done, still nothing unpickled
    for name in PLANTED:
        shutil.copy(payload, run / "state" / name)
    again = _trained(prepared, run)
    assert "nothing to train" in again.stderr and not marker.exists()


@pytest.mark.slow  # two more trainings
def test_a_broken_state_file_is_named_and_the_run_starts_afresh(prepared, straight, tmp_path):
    run = tmp_path / "run"
    assert _train(prepared, run, die_at="best:1").returncode == 137
    (run / "state" / "optimizer.safetensors").write_bytes(b"not safetensors")
    rerun = _trained(prepared, run)
    warnings = [line for line in rerun.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and f"{run}/state/optimizer.safetensors: not a readable safetensors file" in warnings[0]
    assert warnings[0].endswith("starting afresh") and "resumed at" not in rerun.stderr
    _assert_same_weights(run, straight)


# --- atomic folder swaps ---


def _die_between_renames(staging: Path, target: Path) -> int:
    code = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
from pipeline.core.io import replace_directory
real = os.replace
def replace(src, dst):
    if str(src).endswith(".staging"):
        os._exit(137)
    real(src, dst)
os.replace = replace
replace_directory({str(staging)!r}, {str(target)!r})
"""
    return subprocess.run([sys.executable, "-c", code], env=_env(), timeout=60).returncode


def test_a_swap_killed_between_its_renames_is_recovered(tmp_path):
    target = tmp_path / "out"
    with writing_directory(target) as staging:
        (staging / "a.txt").write_text("old")
    assert _files(target) == {"a.txt": b"old"} and not staging.exists()

    staging = staging_path(target)
    staging.mkdir()
    (staging / "a.txt").write_text("new")
    assert _die_between_renames(staging, target) == 137
    assert not target.exists() and old_path(target).is_dir()  # killed inside the swap
    recover_directory(target)
    assert _files(target) == {"a.txt": b"old"}
    assert not old_path(target).exists() and not staging.exists()

    with pytest.raises(RuntimeError):  # a writer that fails leaves the old folder as it was
        with writing_directory(target) as staging:
            (staging / "a.txt").write_text("half")
            raise RuntimeError
    assert _files(target) == {"a.txt": b"old"} and not staging.exists()
    replace_directory(_staged(target, "new"), target)
    assert _files(target) == {"a.txt": b"new"} and not old_path(target).exists()


def _staged(target: Path, text: str) -> Path:
    staging = staging_path(target)
    staging.mkdir()
    (staging / "a.txt").write_text(text)
    return staging


# state: its second save (step 4), the first (step 2) kept as old; best/, last/: their first save
@pytest.mark.parametrize("die_at, resumed_at", [
    ("state:2", 2),
    pytest.param("best:1", 8, marks=pytest.mark.slow),  # one more training each: the slow tier
    pytest.param("last:1", None, marks=pytest.mark.slow),
])
def test_training_killed_inside_a_swap_reruns_to_the_same_result(prepared, straight, tmp_path, die_at, resumed_at):
    run = tmp_path / "run"
    assert _train(prepared, run, die_at=die_at).returncode == 137
    folder = run / die_at.split(":")[0]
    assert not folder.exists() and staging_path(folder).is_dir()
    assert old_path(folder).is_dir() == (resumed_at == 2)
    rerun = _trained(prepared, run)
    assert ("restored the previous version" in rerun.stderr) == (resumed_at == 2)
    assert "starting afresh" not in rerun.stderr
    if resumed_at is None:  # killed after the last state: the run is finished, last/ written from it
        assert "nothing to train" in rerun.stderr and f"writing {folder} from the saved state" in rerun.stderr
    else:
        assert f"(global step {resumed_at})" in rerun.stderr
    _assert_same_weights(run, straight)
    assert _files(run) == _files(straight)  # no leftover staging or old folder either


@pytest.mark.slow  # three 2-process trainings
def test_two_processes_killed_resume_to_the_same_weights(tmp_path):
    from test_training import _project, _train as train_stage, start_training_until

    torchrun = (str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m")
    straight_project, killed = _project(tmp_path / "straight"), _project(tmp_path / "killed")
    train_stage(straight_project, launcher=torchrun)
    process = start_training_until(killed, torchrun, step=6)
    import psutil

    workers = psutil.Process(process.pid).children(recursive=True)  # in sessions of their own
    for victim in [process, *workers]:
        os.kill(victim.pid, signal.SIGKILL)
    process.wait()
    psutil.wait_procs(workers, timeout=30)
    assert {"rng-0.json", "rng-1.json"} <= {p.name for p in (killed / "models/baseline/state").iterdir()}
    rerun = train_stage(killed, launcher=torchrun)
    assert "resumed at" in rerun.stderr and "starting afresh" not in rerun.stderr
    _assert_same_weights(killed / "models" / "baseline", straight_project / "models" / "baseline")


STAGE_DRIVER = """
import os, runpy, sys
real = os.replace
def replace(src, dst):
    if os.path.basename(str(src)) == os.environ["DIE_AT_STAGING"]:
        os._exit(137)
    real(src, dst)
if os.environ.get("DIE_AT_STAGING"):
    os.replace = replace
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def test_prepare_killed_inside_its_swap_reruns_to_the_same_output(tmp_path):
    from tiny_project import make_tiny_project, stage_command

    project = make_tiny_project(tmp_path / "project")
    words = stage_command("prepare", repo=project)[2:]  # stages.prepare --out data/prepared ...

    def run(die: bool) -> int:
        env = {**_env(), "PYTHONPATH": str(project), **({"DIE_AT_STAGING": ".prepared.staging"} if die else {})}
        return subprocess.run([sys.executable, "-c", STAGE_DRIVER, *words], cwd=project, env=env,
                              capture_output=True, text=True, timeout=300).returncode

    out = project / "data" / "prepared"
    assert run(die=False) == 0
    first = _files(out)
    assert "report.json" in first and any(name.endswith(".tar") for name in first)
    assert run(die=True) == 137  # the old folder renamed away, the new one not yet in
    assert not out.exists() and old_path(out).is_dir() and staging_path(out).is_dir()
    assert run(die=False) == 0
    assert _files(out) == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]  # no staging or old folder left


def test_a_state_that_does_not_fit_the_run_is_one_error_naming_the_file(prepared, straight, tmp_path):
    from pipeline.checkpointing import StateError, apply_training_state, read_training_state
    from pipeline.optimization import make_accelerator
    from pipeline.run_folder import RunFolder
    from pipeline.training import Trainer

    params = params_from_dict(deep_merge(TINY_PROFILE, TINY_TRAINING))
    trainer = Trainer(params, prepared, RunFolder(tmp_path / "run"), make_accelerator(params, cpu=True))
    state = shutil.copytree(straight / "state", tmp_path / "state")
    saved = read_training_state(state, trainer.accelerator)
    apply_training_state(saved, trainer.accelerator, trainer.model, trainer.optimizer, trainer.scheduler)
    assert trainer.scheduler.last_epoch == 16 and trainer.optimizer.state_dict()["state"][0]["step"].item() == 16

    optimizer = json.loads((state / "optimizer.json").read_text())
    optimizer["param_groups"].pop()
    (state / "optimizer.json").write_text(json.dumps(optimizer))
    with pytest.raises(StateError, match=rf"^{state}/optimizer.json: does not fit this run \(.*parameter groups"):
        apply_training_state(read_training_state(state, trainer.accelerator), trainer.accelerator, trainer.model,
                             trainer.optimizer, trainer.scheduler)


@pytest.mark.slow  # three index stages in subprocesses
def test_index_killed_inside_its_swap_reruns_to_the_same_output(prepared, tmp_path):
    from test_search import make_search_project
    from tiny_project import REPO, stage_command

    project = make_search_project(tmp_path / "project", prepared)  # index/baseline built once already
    words = stage_command("index@baseline")[2:]
    out = project / "index" / "baseline"

    def run(die: bool) -> int:
        env = {**_env(), "PYTHONPATH": str(REPO), **({"DIE_AT_STAGING": ".baseline.staging"} if die else {})}
        return subprocess.run([sys.executable, "-c", STAGE_DRIVER, *words], cwd=project, env=env,
                              capture_output=True, text=True, timeout=300).returncode

    assert run(die=False) == 0
    first = _files(out)
    assert run(die=True) == 137  # the old index renamed away, the new one not yet in
    assert not out.exists() and old_path(out).is_dir() and staging_path(out).is_dir()
    assert run(die=False) == 0
    assert _files(out) == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["baseline"]


@pytest.mark.slow  # one more training
def test_a_fresh_run_replaces_best_and_last_of_the_previous_configuration(prepared, straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    fingerprint = json.loads((straight / "last" / "training.json").read_text())["fingerprint"]
    for path in (run / "state" / "progress.json", run / "best" / "training.json", run / "last" / "training.json"):
        saved = json.loads(path.read_text())
        path.write_text(json.dumps({**saved, "fingerprint": "another-configuration"}))
    result = _trained(prepared, run)
    assert "from another configuration: starting afresh" in result.stderr
    for which in ("best", "last"):
        assert json.loads((run / which / "training.json").read_text())["fingerprint"] == fingerprint, which
    _assert_same_weights(run, straight)
