"""`python -m pipeline check-data` on the real CUHK-PEDES excerpt and on broken copies of it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def check_data(capsys, root: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["check-data", "--format", "cuhk-pedes", "--root", str(root), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def edit_annotations(root: Path, change) -> None:
    path = root / "reid_raw.json"
    entries = json.loads(path.read_text())
    change(entries)
    path.write_text(json.dumps(entries))


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


def test_module_entry_point(cuhk_mini):
    command = [sys.executable, "-m", "pipeline", "check-data", "--format", "cuhk-pedes", "--root", str(cuhk_mini)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "OK: 32 records, no problems"


def delete_image(name):
    return lambda root: (root / "imgs/CUHK01" / name).unlink()


def truncate_image(name):
    def change(root: Path) -> None:
        path = root / "imgs/CUHK01" / name
        path.write_bytes(path.read_bytes()[:2000])

    return change


def convert_image(name, mode):
    def change(root: Path) -> None:
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


def test_module_entry_point_reports_unusable_input_without_traceback(tmp_path):
    (tmp_path / "reid_raw.json").write_text("not json")
    command = [sys.executable, "-m", "pipeline", "check-data", "--format", "cuhk-pedes", "--root", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"check-data: {tmp_path / 'reid_raw.json'}: not valid JSON")
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
