"""Launched runs: DVC starts several processes itself (train.launcher, pdg.launcher), a finished run
is done for any launcher and thread count, the processes agree through the main one, and the stages
that use one process refuse a launcher."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp
import yaml

from pipeline.core.config import ConfigError
from pipeline.core.distributed import RankError, refuse_launcher
from tiny_generator import build_tiny_generator
from tiny_project import TINY_TRAINING, deep_merge, dvc, free_port, make_tiny_project, stage_command, stale_stages

TORCHRUN = "torchrun --standalone --nproc_per_node 2"
LAUNCHED_TRAINING = deep_merge(TINY_TRAINING, {"train": {"num_workers": 1}})  # a loader worker too


def _machine_env() -> dict:
    """A shell as a user has it: the venv first on PATH, and no thread limit (torch takes every core)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    bin_dir = Path(sys.executable).parent
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "DVC_NO_ANALYTICS": "1"}


def _repro(project: Path, *args: str) -> str:
    result = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro", *args], cwd=project,
                            env=_machine_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _set(project: Path, section: str, **values) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # two trainings through dvc repro
def test_a_training_dvc_launched_on_two_processes_is_done_for_a_plain_repro(tmp_path):
    project = make_tiny_project(tmp_path, deep_merge(LAUNCHED_TRAINING, {"train": {"launcher": TORCHRUN}}))
    out = _repro(project, "train@baseline")
    assert f"{TORCHRUN} -m stages.train" in out  # DVC ran the launcher itself
    model = project / "models" / "baseline"
    assert (model / "state" / "rng-1.json").is_file()  # a second process saved its generators
    launched = _tree(model)

    # the same run from a plain shell: all of the machine's threads, one process, another launcher
    _set(project, "train", launcher="python")
    again = _repro(project, "train@baseline")
    assert "nothing to train" in again and "starting afresh" not in again and "epoch 1/2" not in again
    assert _tree(model) == launched  # weights, state and best/last byte-identical
    assert stale_stages(project, "train@baseline") == {}


@pytest.mark.slow  # two generations through dvc repro
def test_a_generation_dvc_launched_on_two_processes_is_done_for_a_plain_repro(tmp_path):
    overrides = {"pdg": {"source_count": 4, "num_samples": 1, "num_steps": 3, "batch_size": 2, "shard_size": 2,
                         "sheet_samples": 2, "launcher": TORCHRUN}}
    project = make_tiny_project(tmp_path, overrides)
    dvc(project, "repro", "prepare")
    (project / "models").mkdir()
    build_tiny_generator(project / "models" / "generator", max_tokens=77)
    out = _repro(project, "--single-item", "generate")
    assert f"{TORCHRUN} -m stages.generate" in out
    raw = project / "data" / "pdg" / "raw"
    launched = _tree(raw)
    assert len([name for name in launched if name.endswith(".tar")]) >= 2

    _set(project, "pdg", launcher="python")
    again = _repro(project, "--single-item", "generate")
    shards = len([name for name in launched if name.endswith(".tar")])
    assert f"wrote 0 shard(s) ({shards} reused)" in again
    assert _tree(raw) == launched


def _agreeing_worker(rank: int, port: int, root: str, results: str) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    from pipeline.core.distributed import accelerator_for, check_shared_folder, on_main

    accelerator = accelerator_for(cpu=True)
    outcome = {}
    # the main process computes, the other is told
    outcome["value"] = on_main(accelerator, lambda: f"computed by rank {accelerator.process_index}")
    try:
        on_main(accelerator, lambda: (_ for _ in ()).throw(ConfigError("params: 'train.lr' is bad")))
    except ConfigError as err:
        outcome["error"] = [type(err).__name__, str(err)]
    check_shared_folder(accelerator, Path(root) / "shared")  # both see it: no error
    try:  # rank 1 on a node whose disk holds another folder at this path
        check_shared_folder(accelerator, Path(root) / f"node-{rank}")
    except RankError as err:
        outcome["blind"] = str(err)
    Path(results, f"rank-{rank}.json").write_text(json.dumps(outcome))
    accelerator.end_training()


@pytest.mark.slow  # two processes with a gloo group
def test_ranks_agree_through_the_main_process_and_a_folder_one_rank_cannot_see_is_one_line(tmp_path):
    mp.spawn(_agreeing_worker, args=(free_port(), str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    outcomes = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    for outcome in outcomes:
        assert outcome["value"] == "computed by rank 0"
        assert outcome["error"] == ["ConfigError", "params: 'train.lr' is bad"]
        assert outcome["blind"].startswith(f"{tmp_path / 'node-0'}: rank 1 on ")
        assert "does not see the file rank 0 wrote there" in outcome["blind"] and "\n" not in outcome["blind"]
    assert not list((tmp_path / "shared").iterdir())  # the token is removed


def test_single_process_stages_refuse_a_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert refuse_launcher("evaluate") is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    line = refuse_launcher("evaluate")
    assert line.startswith("stage evaluate runs in one process, but was started under a launcher with WORLD_SIZE=4")


@pytest.mark.parametrize("dvc_stage", ["evaluate@baseline", "filter", "caption", "index@baseline", "prepare",
                                       "train_generator", "externals"])
def test_a_single_process_stage_under_a_launcher_stops_with_one_line(tmp_path, monkeypatch, capsys, dvc_stage):
    import importlib
    import logging

    command = stage_command(dvc_stage)  # python -m stages.<stage> <its arguments in dvc.yaml>
    stage = command[2].removeprefix("stages.")

    monkeypatch.chdir(tmp_path)  # nothing to read or write here: the stage must stop before either
    monkeypatch.setattr(logging.root, "handlers", [])  # the stage's own log set-up, as in a fresh process
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):  # what torchrun sets
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", [stage, *command[3:]])
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(f"stages.{stage}").main()
    assert stopped.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"stage {stage} runs in one process, but was started under a launcher with " \
        "WORLD_SIZE=2" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_under_a_launcher_each_log_line_names_its_rank_and_the_group_waits_an_hour(monkeypatch, capsys):
    import logging

    from pipeline.core.distributed import PROCESS_GROUP_TIMEOUT, accelerator_for
    from pipeline.core.runtime import setup_logging

    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    setup_logging()
    logging.getLogger("stages.train").error("out of memory")
    assert "[rank 5] ERROR stages.train: out of memory" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    handler = accelerator_for(cpu=True).init_handler  # what the process group is created with
    assert handler.timeout == PROCESS_GROUP_TIMEOUT and PROCESS_GROUP_TIMEOUT.total_seconds() == 3600


@pytest.mark.parametrize("launcher, problem", [
    ("python -m stages.train", "must be python, or start with torchrun or accelerate launch"),
    ("torchrun --nproc_per_node 2 train.py", "names a module or script"),
    ("mpirun -np 8", "must be python, or start with torchrun or accelerate launch"),
    ("accelerate", "must be python, or start with torchrun or accelerate launch"),
])
def test_a_bad_launcher_is_one_line_naming_the_key(launcher, problem):
    from pipeline.core.config import params_from_dict

    for section in ("train", "pdg"):
        with pytest.raises(ConfigError, match=rf"^params: '{section}.launcher' {problem}"):
            params_from_dict({section: {"launcher": launcher}})
    assert params_from_dict({"train": {"launcher": "accelerate launch --multi_gpu --num_processes 8"}})
