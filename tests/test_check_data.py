"""`python -m pipeline check-data` on the real CUHK-PEDES excerpt and on broken copies of it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli import main
from tiny_project import BREAKAGES, convert_image

REPO_ROOT = Path(__file__).resolve().parents[1]


def check_data(capsys, root: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["check-data", "--format", "cuhk-pedes", "--root", str(root), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_clean_excerpt_prints_stats_and_exits_0(cuhk_mini, capsys):
    code, out, err = check_data(capsys, cuhk_mini)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"cuhk-pedes: {cuhk_mini / 'reid_raw.json'}"
    assert lines[1].split() == ["split", "identities", "images", "captions", "words/caption"]
    assert [line.split()[:4] for line in lines[2:5]] == [
        ["train", "5", "20", "40"],
        ["val", "1", "4", "8"],
        ["test", "2", "8", "16"],
    ]
    assert len({len(line) for line in lines[1:5]}) == 1, "the table's columns line up"
    assert lines[5:] == ["OK: 32 records, no problems"]


@pytest.mark.slow  # a subprocess (a fresh interpreter importing torch): the slow tier
def test_module_entry_point(cuhk_mini):
    command = [sys.executable, "-m", "pipeline", "check-data", "--format", "cuhk-pedes", "--root", str(cuhk_mini)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "OK: 32 records, no problems"


# the record index in a problem line, whichever file it names
RECORD_INDEX = re.compile(r" record (\d+)[ :]")


def _record(where: str) -> int:
    return int(RECORD_INDEX.search(where + ":").group(1))


@pytest.mark.parametrize("breakage", BREAKAGES.values(), ids=BREAKAGES.keys())
def test_each_breakage_is_reported_with_file_and_record(cuhk_copy, capsys, breakage):
    break_copy, kind, where = breakage
    break_copy(cuhk_copy)
    code, out, err = check_data(capsys, cuhk_copy)
    assert code == 1 and err == ""
    problem_lines = [line for line in out.splitlines() if f": {kind}: " in line]
    assert len(problem_lines) == 1, out
    assert problem_lines[0].startswith(f"{where}: {kind}: "), problem_lines[0]
    assert out.splitlines()[-1] == "FAILED: 1 problem(s) in 1 of 32 records"


def test_all_problems_are_listed_in_record_order(cuhk_copy, capsys):
    for break_copy, *_ in BREAKAGES.values():
        break_copy(cuhk_copy)
    code, out, _ = check_data(capsys, cuhk_copy)
    problem_lines = out.splitlines()[5:-1]  # after the header line and the 4-line table
    reported = [_record(line.split(": ")[0]) for line in problem_lines]
    assert code == 1
    assert reported == sorted(_record(where) for *_, where in BREAKAGES.values())


NON_RGB = {"L": ("0029003.png", 9), "P": ("0010002.png", 13), "RGBA": ("0022003.png", 5), "CMYK": ("0010001.png", 12)}


def test_non_rgb_images_are_information_not_problems(cuhk_copy, capsys):
    for mode, (name, _) in NON_RGB.items():
        if mode == "CMYK":  # PNG has no CMYK: a JPEG under the same name (PIL reads by content)
            with Image.open(cuhk_copy / "imgs/CUHK01" / name) as image:
                image.convert("CMYK").save(cuhk_copy / "imgs/CUHK01" / name, format="JPEG")
        else:
            convert_image(name, mode)(cuhk_copy)
    code, out, err = check_data(capsys, cuhk_copy)
    assert code == 0 and err == "", out
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert [_record(line) for line in notes] == sorted(record for _, record in NON_RGB.values())
    for mode, (name, record) in NON_RGB.items():
        line = next(line for line in notes if f"record {record}:" in line)
        assert line.startswith(f"note: imgs/CUHK01/{name} record {record}: non-rgb-image: mode {mode}"), line
        assert "converts it to RGB" in line
    assert out.splitlines()[-1] == "OK: 32 records, no problems (4 note(s), listed above)"


@pytest.mark.parametrize(
    "break_copy, expected",
    [
        (lambda root: (root / "reid_raw.json").write_text('[{"split": "train",'), "not valid JSON"),
        (lambda root: (root / "reid_raw.json").write_text("{}"), "expected a JSON list"),
        (lambda root: (root / "reid_raw.json").unlink(), "no such annotation file"),
    ],
    ids=["invalid json", "not a list", "no annotation file"],
)
def test_unusable_annotation_file_exits_2_with_one_line(cuhk_copy, capsys, break_copy, expected):
    break_copy(cuhk_copy)
    code, out, err = check_data(capsys, cuhk_copy)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and expected in err and str(cuhk_copy / "reid_raw.json") in err


def test_no_such_root_exits_2(tmp_path, capsys):
    code, out, err = check_data(capsys, tmp_path / "absent")
    assert (code, out) == (2, "")
    assert err == f"check-data: {tmp_path / 'absent'}: no such data set folder\n"


def test_annotations_option_overrides_the_file(cuhk_copy, capsys):
    (cuhk_copy / "reid_raw.json").rename(cuhk_copy / "renamed.json")
    code, out, _ = check_data(capsys, cuhk_copy, "--annotations", "renamed.json")
    assert code == 0 and out.splitlines()[0].endswith("renamed.json")


@pytest.mark.slow  # a subprocess (a fresh interpreter importing torch): the slow tier
def test_module_entry_point_reports_unusable_input_without_traceback(tmp_path):
    (tmp_path / "reid_raw.json").write_text("not json")
    command = [sys.executable, "-m", "pipeline", "check-data", "--format", "cuhk-pedes", "--root", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"check-data: {tmp_path / 'reid_raw.json'}: not valid JSON")
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
