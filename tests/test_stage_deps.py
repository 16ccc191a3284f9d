"""A stage's deps are what it imports: every project file its entry point runs (transitively,
ast) is a dep in dvc.yaml, itself or through its folder, so editing it reruns the stage."""

from __future__ import annotations

from pathlib import Path

import pytest
from dvc.repo import Repo

from pipeline.imports import covering_deps, import_closure

REPO = Path(__file__).resolve().parents[1]


def _stage_deps() -> dict[str, set[str]]:
    with Repo(str(REPO)) as repo:
        found: dict[str, set[str]] = {}
        for stage in repo.index.stages:
            found.setdefault(stage.addressing.split("@")[0], set()).update(str(d.def_path) for d in stage.deps)
        return found


DEPS = _stage_deps()


@pytest.mark.parametrize("stage", sorted(DEPS))
def test_every_imported_project_file_is_a_dep(stage):
    deps = DEPS[stage]
    missing = sorted(str(f) for f in import_closure(f"stages.{stage}")
                     if not any(str(f) == d or str(f).startswith(d.rstrip("/") + "/") for d in deps))
    assert not missing, f"dvc.yaml: stage {stage} imports {missing} without depending on them"


def test_the_closure_follows_lazy_and_relative_imports_but_not_type_checking_ones(tmp_path):
    (tmp_path / "pipeline" / "sub").mkdir(parents=True)
    (tmp_path / "stages").mkdir()
    files = {
        "pipeline/__init__.py": "",
        "pipeline/sub/__init__.py": "from .leaf import x\n",
        "pipeline/sub/leaf.py": "x = 1\n",
        "pipeline/lazy.py": "def f():\n    from pipeline import sub\n",
        "pipeline/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline import unused\n",
        "pipeline/unused.py": "",
        "pipeline/other.py": "",
        "stages/__init__.py": "",
        "stages/one.py": "import numpy\nfrom pipeline import lazy, typed\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    closure = {str(p) for p in import_closure("stages.one", tmp_path)}
    assert closure == {"stages/__init__.py", "stages/one.py", "pipeline/__init__.py", "pipeline/lazy.py",
                       "pipeline/typed.py", "pipeline/sub/__init__.py", "pipeline/sub/leaf.py"}
    # a folder stands for its files when every one of them is imported
    assert "pipeline/sub" in covering_deps("stages.one", tmp_path)
