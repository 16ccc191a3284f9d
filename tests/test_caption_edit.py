"""Colour caption editing: the hard cases by hand, the CLI, coverage and the 100 hand-reviewed edits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.text import PALETTE, edit_caption, edit_captions, find_color_phrases
from tiny_project import require_fixture

FIXTURES = Path(os.environ.get("TBPS_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
REAL_ANNOTATIONS = FIXTURES / "cuhk-pedes-test-annotations" / "test_reid.json"
REVIEWED_EDITS = Path(__file__).parent / "data" / "reviewed_edits.jsonl"
REPO = Path(__file__).resolve().parents[1]


def edited(caption: str, palette: tuple[str, ...], **kwargs) -> str | None:
    edit = edit_caption(caption, np.random.default_rng(0), palette=palette, **kwargs)
    return None if edit is None else edit.edited


def phrases(caption: str, **kwargs) -> list[tuple[str, list[str], str]]:
    return [(p.text, [c.text for c in p.colors], p.noun) for p in find_color_phrases(caption, **kwargs)]


@pytest.fixture
def real_captions() -> list[str]:
    require_fixture(REAL_ANNOTATIONS)
    return [caption for record in json.loads(REAL_ANNOTATIONS.read_text()) for caption in record["captions"]]


def test_multi_colour_phrase_edits_one_colour_to_a_colour_outside_the_phrase():
    caption = "A man wearing a blue and white striped tank top."
    assert phrases(caption) == [("blue and white striped tank top", ["blue", "white"], "tank top")]
    edits = edit_captions([caption], num=5, seed=0, palette=("blue", "white", "green"))[0]
    assert sorted(edit.edited for edit in edits) == [
        "A man wearing a blue and green striped tank top.",
        "A man wearing a green and white striped tank top.",
    ]


def test_comma_lists_and_hyphenated_pairs_are_multi_colour():
    assert phrases("a red, white and blue scarf") == [("red, white and blue scarf", ["red", "white", "blue"], "scarf")]
    assert phrases("black-and-white sneakers") == [("black-and-white sneakers", ["black", "white"], "sneakers")]
    assert phrases("black, white socks") == [("white socks", ["white"], "socks")]


def test_shade_modifier_is_replaced_with_its_colour():
    assert edited("He wears dark blue jeans.", ("green",)) == "He wears green jeans."
    assert edited("a navy blue coat", ("blue", "red")) == "a red coat"
    assert edited("a light-gray hoodie", ("green",)) == "a green hoodie"


def test_shade_without_a_colour_is_skipped():
    assert phrases("a light colored shirt, dark-colored pants and dark shoes") == []


def test_hyphenated_blend_and_hyphenated_nouns():
    [phrase] = find_color_phrases("a grey-blue t-shirt")
    assert phrase.noun == "t-shirt" and phrase.families == {"gray", "blue"}
    assert edited("a grey-blue t-shirt", ("gray", "blue", "green")) == "a green t-shirt"


def test_plural_nouns():
    expected = [("blue jeans", ["blue"], "jeans"), ("black shoes", ["black"], "shoes")]
    assert phrases("blue jeans and black shoes") == expected


def test_grey_and_gray_are_the_same_colour():
    assert edited("a grey coat", ("gray",)) is None
    assert edited("a grey coat", ("gray", "pink")) == "a pink coat"


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a shirt that is red.", "a shirt that is green."),
        ("His pants are black.", "His pants are green."),
        ("shoes which are white", "shoes which are green"),
        ("Her boots are all black.", "Her boots are all green."),
        ("a sweatshirt colored gray", "a sweatshirt colored green"),
    ],
)
def test_colour_after_its_noun(caption, expected):
    assert edited(caption, ("green",)) == expected


def test_fillers_between_colour_and_noun():
    assert phrases("a red long-sleeved plaid shirt") == [("red long-sleeved plaid shirt", ["red"], "shirt")]
    assert phrases("white, short sleeved blouse") == [("white, short sleeved blouse", ["white"], "blouse")]
    assert phrases("black slip-on shoes") == [("black slip-on shoes", ["black"], "shoes")]


@pytest.mark.parametrize(
    "caption",
    ["A woman with black hair.", "A white man walks by a white car.", "black skin", "a white background",
     "The man has black, short cut hair.", "He is dressed in black.", "a black logo on the front"],
)
def test_colours_of_non_garments_are_not_phrases(caption):
    assert find_color_phrases(caption) == []


def test_hair_only_with_allow_hair():
    assert edited("A woman with black hair.", ("green",)) is None
    assert edited("A woman with black hair.", ("green",), allow_hair=True) == "A woman with green hair."
    assert edited("Her hair is brown.", ("green",), allow_hair=True) == "Her hair is green."


def test_capitalisation_is_kept():
    assert edited("Red shirt and jeans.", ("green",)) == "Green shirt and jeans."
    assert edited("A RED SHIRT", ("green",)) == "A GREEN SHIRT"


def test_article_follows_the_new_colour():
    assert edited("She has a red bag.", ("orange",)) == "She has an orange bag."
    assert edited("An orange bag.", ("red",)) == "A red bag."
    assert edited("a dark red bag", ("orange",)) == "an orange bag"
    assert edited("a red and orange bag", ("green",)) in {"a green and orange bag", "a red and green bag"}


def test_change_reports_phrases_and_positions():
    edit = edit_caption("She has a red bag.", np.random.default_rng(0), palette=("orange",))
    [change] = edit.changes
    assert (change.phrase_before, change.phrase_after) == ("a red bag", "an orange bag")
    assert (change.old_color, change.new_color) == ("red", "orange")
    assert [edit.edited[a:b] for a, b in change.changed_spans] == ["an", "orange"]
    assert change.changed_words == (2, 3)


def test_several_edits_in_one_caption():
    edit = edit_caption("a red hat and blue jeans", np.random.default_rng(0), palette=("green",), num_edits=2)
    assert edit.edited == "a green hat and green jeans"
    assert [change.changed_words for change in edit.changes] == [(1,), (4,)]


def test_new_colour_differs_from_old_and_is_deterministic():
    captions = ["a navy blue coat", "a red, white and blue scarf", "grey pants and a black backpack"] * 20
    first = edit_captions(captions, num=3, seed=7)
    assert first == edit_captions(captions, num=3, seed=7)
    assert first != edit_captions(captions, num=3, seed=8)
    for caption, edits in zip(captions, first):
        families = {phrase.text: phrase.families for phrase in find_color_phrases(caption)}
        for change in (edit.changes[0] for edit in edits):
            [phrase_families] = [f for text, f in families.items() if change.phrase_before.endswith(text)]
            assert change.new_color in PALETTE and change.new_color not in phrase_families


def test_distinct_edits_visit_every_phrase_first():
    edits = edit_captions(["red hats and blue jeans"], num=3, seed=0)[0]
    assert len({edit.edited for edit in edits}) == 3
    assert {edit.changes[0].phrase_before for edit in edits[:2]} == {"red hats", "blue jeans"}


def test_cli_on_text_file(tmp_path, capsys):
    source = tmp_path / "captions.txt"
    source.write_text("A woman in a red coat.\n\nno colour here\nHis pants are black.\n")
    assert main(["edit-captions", "--input", str(source), "--num", "2", "--seed", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["caption_index"] for row in rows] == [0, 0, 2, 2]
    assert len({row["edited"] for row in rows}) == 4
    for row in rows:
        assert set(row) >= {"source", "edited", "changes", "changed_words"}
        change = row["changes"][0]
        assert change["phrase_before"] in row["source"] and change["phrase_after"] in row["edited"]


def test_cli_on_annotation_json(tmp_path):
    annotations = tmp_path / "reid_raw.json"
    annotations.write_text(json.dumps([{"id": 1, "captions": ["a black backpack", "a man"]}]))
    output = tmp_path / "edits.jsonl"
    arguments = ["--input", str(annotations), "--num", "1", "--seed", "0", "--output", str(output)]
    assert main(["edit-captions", *arguments]) == 0
    [row] = [json.loads(line) for line in output.read_text().splitlines()]
    assert row["source"] == "a black backpack" and row["edited"].endswith(" backpack")


def test_cli_on_real_annotations(real_captions, tmp_path):
    output = tmp_path / "edits.jsonl"
    assert main(["edit-captions", "--input", str(REAL_ANNOTATIONS), "--seed", "0", "--output", str(output)]) == 0
    assert len(output.read_text().splitlines()) >= 0.85 * len(real_captions)


@pytest.mark.parametrize(("name", "content"), [("missing.txt", None), ("bad.json", "[{"), ("flat.json", '{"a": 1}')])
def test_cli_unusable_input_exits_2(tmp_path, capsys, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    assert main(["edit-captions", "--input", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("edit-captions: ") and error.count("\n") == 1


@pytest.mark.slow  # a subprocess (a fresh interpreter importing torch): the slow tier
def test_cli_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "edit-captions", "--input", str(tmp_path / "missing.txt")],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_coverage_on_real_captions(real_captions):
    covered = sum(bool(find_color_phrases(caption)) for caption in real_captions)
    assert covered / len(real_captions) >= 0.85


def test_reviewed_edits_are_reproduced():
    reviewed = [json.loads(line) for line in REVIEWED_EDITS.read_text().splitlines()]
    assert len(reviewed) == 100
    for record in (r for r in reviewed if r["verdict"] == "ok"):
        edit = edit_caption(record["source"], np.random.default_rng([record["seed"], record["index"]]))
        assert edit is not None and edit.edited == record["edited"], record["source"]
