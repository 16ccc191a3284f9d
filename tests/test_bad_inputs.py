"""Every bad input is one clear line and an exit code, and nothing is written or lost.

Each case breaks one thing in a copy of a tiny project (params, the data under data.root, a
shard, a model folder, a command-line argument), runs the stage (its command as DVC renders it)
or the command as `python -m` would, in a child forked from one interpreter that imported torch and
the stages once (conftest.py's stage_runner, tests/stage_server.py), and asserts: the exit code;
exactly one error line, matching the case's message, and no traceback; and that every file of the
project is byte-identical afterwards (a failed run neither writes an output nor deletes one).
README's reliability table lists CASES.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tiny_project import BREAKAGES, make_tiny_project, save_tiny_model, stage_command

pytestmark = pytest.mark.slow  # ~35 stages, each in a child process of the stage server


def _params(project: Path, change: Callable[[dict], None]) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    change(raw)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def set_param(key: str, value) -> Callable[[Path], None]:
    def change(raw: dict) -> None:
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
    return lambda project: _params(project, change)


def drop_param(key: str) -> Callable[[Path], None]:
    section, name = key.split(".")
    return lambda project: _params(project, lambda raw: raw[section].pop(name))


def params_text(old: str, new: str) -> Callable[[Path], None]:
    """A textual edit of params.yaml, as a person would make it (a repeated key, `.nan`)."""
    def change(project: Path) -> None:
        path = project / "params.yaml"
        text = path.read_text()
        assert old in text, old
        path.write_text(text.replace(old, new, 1))
    return change


def real_data(breakage: Callable[[Path], None]) -> Callable[[Path], None]:
    """data.source cuhk-pedes on a copy of the real excerpt (beside the project), broken by `breakage`."""
    def change(project: Path) -> None:
        root = project.parent / "cuhk-pedes-mini"
        breakage(root)
        set_param("data.source", "cuhk-pedes")(project)
        set_param("data.root", str(root))(project)
    return change


def damage_file(relative: str, payload: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def change(project: Path) -> None:
        path = project / relative
        path.write_bytes(payload(path.read_bytes()))
    return change


def remove(relative: str) -> Callable[[Path], None]:
    return lambda project: (project / relative).unlink()


@dataclass(frozen=True)
class Case:
    kind: str
    what: str
    breaks: Callable[[Path], None]
    stage: str  # a DVC stage (run with its dvc.yaml command), or "cli:<args>" for python -m pipeline
    message: str  # a regular expression the one error line matches
    code: int = 1
    extra: list[str] = field(default_factory=list)  # appended to the stage's command


SHARD = "data/prepared/shards/train-000000.tar"
MODEL = "models/baseline/best"

CASES = [
    # params.yaml
    Case("params", "a missing key", drop_param("train.lr"), "prepare", r"missing key 'train\.lr'"),
    Case("params", "an unknown key", set_param("train.learning_rate", 0.1), "prepare", r"train\.learning_rate"),
    Case("params", "a repeated key", params_text("  lr: 0.0005", "  lr: 0.0005\n  lr: 0.001"), "prepare",
         r"key 'lr' appears twice in one mapping \(lines \d+ and \d+\)"),
    Case("params", "NaN", params_text("  lr: 0.0005", "  lr: .nan"), "prepare", r"'train\.lr' must be a finite number, got nan"),
    Case("params", "an infinite float", params_text("  margin_level:", "  margin_level: .inf #"), "prepare",
         r"'filter\.margin_level' must be a finite number, got inf"),
    Case("params", "a negative seed", set_param("train.seed", -1), "prepare", r"'train\.seed' must be in \[0, None\]"),
    Case("params", "a value of the wrong type", set_param("train.epochs", "ten"), "prepare", r"'train\.epochs' must be"),
    Case("params", "a value out of range", set_param("train.lr", -0.1), "prepare", r"'train\.lr' must be in"),
    Case("params", "an unknown choice", set_param("model.preset", "huge"), "prepare", r"'model\.preset' must be one of"),
    Case("params", "a patch size that does not divide the image", set_param("data.image_height", 60), "prepare",
         r"'model\.patch_size' 8 does not divide the image size 60x32"),
    Case("params", "an img2img strength that leaves no step",
         lambda p: (set_param("pdg.method", "img2img")(p), set_param("pdg.strength", 0.01)(p)), "prepare",
         r"'pdg\.strength' 0\.01 leaves none of the \d+ steps"),
    Case("params", "a file that is not YAML", lambda p: (p / "params.yaml").write_text("data: [unclosed\n"), "prepare",
         r"not valid YAML"),
    Case("params", "a weights folder that does not exist", set_param("caption.captioner", "/nowhere/blip"), "caption",
         r"'caption\.captioner' /nowhere/blip: no such folder"),
    Case("params", "a generator folder without its UNet",
         lambda p: (_generator_without_unet(p), set_param("generator.pretrained", str(p.parent / "sd"))(p)), "generate",
         r"'generator\.pretrained' .*/sd: no unet/config\.json in it"),
    Case("params", "a hub id without a pinned revision", set_param("caption.captioner", "Salesforce/blip-base"),
         "caption", r"is a hub id, but hub\.revision is empty"),
    Case("params", "an unknown variant", lambda p: None, "train@baseline", r"no variant 'nobody'",
         extra=["--variant", "nobody"]),
    # the data under data.root (prepare, on the real CUHK-PEDES excerpt)
    *[Case("data", name, real_data(breakage), "prepare", re.escape(where))
      for name, (breakage, _, where) in BREAKAGES.items()
      if name in ("deleted image", "not an image", "blank caption", "id is a string", "path out of the root",
                  "absolute path", "symlink out of the root", "the same image spelled with ./", "id beyond 64 bits")],
    Case("data", "an annotation file that is not JSON",
         real_data(lambda root: (root / "reid_raw.json").write_text("[{not json")), "prepare", r"reid_raw\.json"),
    Case("data", "no annotation file", real_data(lambda root: (root / "reid_raw.json").unlink()), "prepare",
         r"reid_raw\.json"),
    # outputs of earlier stages
    Case("shards", "a truncated shard", damage_file(SHARD, lambda b: b[: len(b) // 3]), "train@baseline",
         r"train-000000\.tar.*dvc repro --force prepare"),
    Case("shards", "an empty shard", damage_file(SHARD, lambda b: b""), "train@baseline",
         r"train-000000\.tar.*dvc repro --force prepare"),
    Case("model folders", "a model without its weights", remove(f"{MODEL}/model.safetensors"), "evaluate@baseline",
         r"without its weights \(model\.safetensors\): dvc repro --force train@baseline"),
    Case("model folders", "a model config that is not JSON", damage_file(f"{MODEL}/dual_encoder.json", lambda b: b"{no"),
         "evaluate@baseline", r"dual_encoder\.json: not JSON .*dvc repro --force train@baseline"),
    # command lines
    Case("CLI", "a stage without a required path", lambda p: None, "train@baseline",
         r"the following arguments are required: --model", code=2, extra=["--drop", "--model"]),
    Case("CLI", "search with an empty query", lambda p: None, "cli:search|   |--variant|baseline", r"the query is empty"),
    Case("CLI", "search with k of 0", lambda p: None, "cli:search|a man|-k|0|--variant|baseline",
         r"k is 0: it must be at least 1"),
    Case("CLI", "search before the index is built", lambda p: None, "cli:search|a man|--variant|pdg",
         r"no trained model in models/pdg/best: run `dvc repro train@pdg` first"),
]


def _generator_without_unet(project: Path) -> None:
    folder = project.parent / "sd"
    (folder / "vae").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "vae" / "config.json").write_text("{}")


@pytest.fixture(scope="module")
def base(prepared, tmp_path_factory, cuhk_mini_module) -> Path:
    project = make_tiny_project(tmp_path_factory.mktemp("bad-inputs") / "project")
    shutil.copytree(prepared, project / "data" / "prepared")
    save_tiny_model(project / MODEL, prepared)
    (project / MODEL / "training.json").write_text('{"epoch": 1}')
    shutil.copytree(cuhk_mini_module, project.parent / "cuhk-pedes-mini")
    return project


@pytest.fixture(scope="module")
def cuhk_mini_module() -> Path:
    from tiny_project import FIXTURES, require_fixture

    return require_fixture(FIXTURES / "cuhk-pedes-mini" / "reid_raw.json").parent


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root (links as their target), and every folder, but DVC's own
    folder and Python's caches."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if "/.dvc/" in f"/{relative}/" or "__pycache__" in relative:
            continue
        found[relative] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return found


def _command(case: Case) -> list[str]:
    if case.stage.startswith("cli:"):
        return [sys.executable, "-m", "pipeline", *case.stage[4:].split("|")]
    command = stage_command(case.stage)
    if case.extra[:1] == ["--drop"]:  # leave a required argument and its value out
        at = command.index(case.extra[1])
        return command[:at] + command[at + 2:]
    if case.extra[:1] == ["--variant"]:
        at = command.index("--variant")
        return command[: at + 1] + [case.extra[1]] + command[at + 2:]
    return command + case.extra


def error_lines(stderr: str) -> list[str]:
    """The error lines, less prepare's closing count of the problems it listed (one line each)."""
    return [line for line in stderr.splitlines() if (re.search(r"(^|\s)ERROR\s", line) or re.search(r"(^|: )error: ", line))
            and "problem(s) found (listed above)" not in line]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}: {c.what}" for c in CASES])
def test_a_bad_input_is_one_line_an_exit_code_and_nothing_written(case, base, stage_runner, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(base.parent, work, symlinks=True)
    project = work / "project"
    case.breaks(project)
    before = _tree(work)
    result = stage_runner.run(_command(case), cwd=project, timeout=300)
    errors = error_lines(result.stderr)
    assert result.returncode == case.code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.search(case.message, errors[0]), errors[0]
    assert _tree(work) == before  # nothing written, nothing lost


def test_the_suite_has_at_least_25_cases_of_every_kind():
    kinds = {case.kind for case in CASES}
    assert len(CASES) >= 25 and kinds == {"params", "data", "shards", "model folders", "CLI"}
    assert len({(c.kind, c.what) for c in CASES}) == len(CASES)


def reliability_table() -> str:
    """README's reliability table: per kind of input, its cases (exit 1 unless noted)."""
    rows = ["| input | what is wrong: one line naming it, nothing written |", "|---|---|"]
    for kind in dict.fromkeys(case.kind for case in CASES):
        cases = [c.what + (f" (exit {c.code})" if c.code != 1 else "") for c in CASES if c.kind == kind]
        rows.append(f"| {kind} | {'; '.join(cases)} |")
    return "\n".join(rows) + "\n"


def test_readme_lists_every_case():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert reliability_table() in readme, "README's reliability table: python tests/test_bad_inputs.py prints it"


if __name__ == "__main__":  # print the table for README
    print(reliability_table(), end="")
