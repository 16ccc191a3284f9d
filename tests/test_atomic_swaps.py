"""A folder swap killed between its two renames is recovered: by recover_directory, and by the rerun
of a training, of prepare and of index, each to the same output as a run never killed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.io import old_path, recover_directory, replace_directory, staging_path, writing_directory
from tiny_project import REPO, assert_same_weights, folder_files, make_tiny_project, stage_command


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


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
    assert folder_files(target) == {"a.txt": b"old"} and not staging.exists()

    staging = staging_path(target)
    staging.mkdir()
    (staging / "a.txt").write_text("new")
    assert _die_between_renames(staging, target) == 137
    assert not target.exists() and old_path(target).is_dir()  # killed inside the swap
    recover_directory(target)
    assert folder_files(target) == {"a.txt": b"old"}
    assert not old_path(target).exists() and not staging.exists()

    with pytest.raises(RuntimeError):  # a writer that fails leaves the old folder as it was
        with writing_directory(target) as staging:
            (staging / "a.txt").write_text("half")
            raise RuntimeError
    assert folder_files(target) == {"a.txt": b"old"} and not staging.exists()
    replace_directory(_staged(target, "new"), target)
    assert folder_files(target) == {"a.txt": b"new"} and not old_path(target).exists()


def _staged(target: Path, text: str) -> Path:
    staging = staging_path(target)
    staging.mkdir()
    (staging / "a.txt").write_text(text)
    return staging


# state: its second save (step 4), the first (step 2) kept as old; best/, last/: their first save
@pytest.mark.parametrize("die_at, resumed_at", [
    pytest.param("state:2", 2, marks=pytest.mark.slow),  # a killed training subprocess: the slow tier
    pytest.param("best:1", 8, marks=pytest.mark.slow),
    pytest.param("last:1", None, marks=pytest.mark.slow),
])
def test_training_killed_inside_a_swap_reruns_to_the_same_result(training_driver, straight_training, tmp_path, die_at,
                                                                  resumed_at):
    run = tmp_path / "run"
    assert training_driver.run(run, die_at=die_at).returncode == 137
    folder = run / die_at.split(":")[0]
    assert not folder.exists() and staging_path(folder).is_dir()
    assert old_path(folder).is_dir() == (resumed_at == 2)
    rerun = training_driver.trained(run)
    assert ("restored the previous version" in rerun.stderr) == (resumed_at == 2)
    assert "starting afresh" not in rerun.stderr
    if resumed_at is None:  # killed after the last state: the run is finished, last/ written from it
        assert "nothing to train" in rerun.stderr and f"writing {folder} from the saved state" in rerun.stderr
    else:
        assert f"(global step {resumed_at})" in rerun.stderr
    assert_same_weights(run, straight_training)
    assert folder_files(run) == folder_files(straight_training)  # no leftover staging or old folder either


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


@pytest.mark.slow  # a subprocess (a fresh interpreter importing torch): the slow tier
def test_prepare_killed_inside_its_swap_reruns_to_the_same_output(tmp_path):
    project = make_tiny_project(tmp_path / "project")
    words = stage_command("prepare", repo=project)[2:]  # stages.prepare --out data/prepared ...

    def run(die: bool) -> int:
        env = {**_env(), "PYTHONPATH": str(project), **({"DIE_AT_STAGING": ".prepared.staging"} if die else {})}
        return subprocess.run([sys.executable, "-c", STAGE_DRIVER, *words], cwd=project, env=env,
                              capture_output=True, text=True, timeout=300).returncode

    out = project / "data" / "prepared"
    assert run(die=False) == 0
    first = folder_files(out)
    assert "report.json" in first and any(name.endswith(".tar") for name in first)
    assert run(die=True) == 137  # the old folder renamed away, the new one not yet in
    assert not out.exists() and old_path(out).is_dir() and staging_path(out).is_dir()
    assert run(die=False) == 0
    assert folder_files(out) == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]  # no staging or old folder left


@pytest.mark.slow  # three index stages in subprocesses
def test_index_killed_inside_its_swap_reruns_to_the_same_output(training_driver, tmp_path):
    from tiny_project import make_search_project

    project = make_search_project(tmp_path / "project", training_driver.prepared)  # index/baseline built once already
    words = stage_command("index@baseline")[2:]
    out = project / "index" / "baseline"

    def run(die: bool) -> int:
        env = {**_env(), "PYTHONPATH": str(REPO), **({"DIE_AT_STAGING": ".baseline.staging"} if die else {})}
        return subprocess.run([sys.executable, "-c", STAGE_DRIVER, *words], cwd=project, env=env,
                              capture_output=True, text=True, timeout=300).returncode

    assert run(die=False) == 0
    first = folder_files(out)
    assert run(die=True) == 137  # the old index renamed away, the new one not yet in
    assert not out.exists() and old_path(out).is_dir() and staging_path(out).is_dir()
    assert run(die=False) == 0
    assert folder_files(out) == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["baseline"]
