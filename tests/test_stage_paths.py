"""Every path a stage reads or writes is written once, in dvc.yaml: given on the stage's command
line, and declared there as a dep, an out, a metric or a plot."""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
from dvc.repo import Repo

REPO = Path(__file__).resolve().parents[1]
NOT_PATHS = {"--variant", "--params"}


def _stages():
    with Repo(str(REPO)) as repo:
        return [(stage.addressing, shlex.split(stage.cmd), {str(d.def_path) for d in stage.deps},
                 {str(o.def_path) for o in stage.outs}) for stage in repo.index.stages]


STAGES = _stages()


def _covered(path: str, declared: set[str]) -> bool:
    return any(path == d or d.startswith(path.rstrip("/") + "/") for d in declared)


@pytest.mark.parametrize("name,words,deps,outs", STAGES, ids=[s[0] for s in STAGES])
def test_each_path_on_a_command_line_is_a_declared_dep_or_out(name, words, deps, outs):
    options = [(w, v) for w, v in zip(words, words[1:]) if w.startswith("--") and w not in NOT_PATHS]
    assert words[:3] == ["python", "-m", f"stages.{name.split('@')[0]}"]
    for option, value in options:
        assert _covered(value, deps | outs), f"{name}: {option} {value} is neither a dep nor an out in dvc.yaml"


def test_what_a_stage_writes_is_on_its_command_line():
    # every out and metric of a stage is reached through one of its path arguments
    for name, words, _, outs in STAGES:
        given = [v for w, v in zip(words, words[1:]) if w.startswith("--") and w not in NOT_PATHS]
        for out in outs:
            assert any(out == g or out.startswith(g.rstrip("/") + "/") for g in given), f"{name}: {out} not on its cmd"


@pytest.mark.parametrize("stage", sorted(p.stem for p in (REPO / "stages").glob("*.py") if p.stem != "__init__"))
def test_no_stage_hard_codes_a_dag_path(stage):
    tree = ast.parse((REPO / "stages" / f"{stage}.py").read_text())
    in_path_calls = {id(arg) for call in ast.walk(tree) if isinstance(call, ast.Call)
                     and getattr(call.func, "id", None) == "Path" for arg in call.args}
    # a prefix test on a param's value ("is this a project folder?") reads no path
    prefix_tests = {id(arg) for call in ast.walk(tree) if isinstance(call, ast.Call)
                    and getattr(call.func, "attr", None) == "startswith" for arg in call.args}
    found = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and id(n) not in prefix_tests
             and (id(n) in in_path_calls or n.value.startswith(("data/", "models/", "metrics/", "reports/", "index/")))]
    assert not found, f"stages/{stage}.py names paths that belong on its dvc.yaml command line: {found}"


def test_a_broken_output_names_the_stage_that_writes_it():
    # pipeline/core/io.py's map from output to stage (for BrokenArtifact lines) agrees with dvc.yaml
    from pipeline.core.io import rerun_hint

    for name, _, _, outs in STAGES:
        for out in outs:
            if out.startswith(("data/", "models/", "index/")):
                assert rerun_hint(f"{out}/member") == f"dvc repro --force {name}", (name, out)
