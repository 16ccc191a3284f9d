"""Source adapters: the real CUHK-PEDES excerpt and synthetic folders in each real format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.sources import LAYOUTS, UnusableInput, load_raw_records, read_source
from pipeline.data.validate import split_stats, validate_source


def write_source(root: Path, annotation_name: str, entries: list[dict], image_field: str = "file_path") -> Path:
    """A data set folder: the annotation list plus a tiny RGB PNG for every record."""
    for number, entry in enumerate(entries):
        image_file = root / "imgs" / entry[image_field]
        image_file.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 8), (number * 7 % 256, 40, 90)).save(image_file)
    (root / annotation_name).write_text(json.dumps(entries))
    return root


def make_entries(ids_by_split: dict[str, list[int]], image_field: str = "file_path", per_id: int = 2) -> list[dict]:
    return [
        {
            "split": split,
            "id": pid,
            "captions": [f"person {pid} view {view}", "a walking person"],
            image_field: f"{split}/{pid:04d}_{view}.png",
        }
        for split, ids in ids_by_split.items()
        for pid in ids
        for view in range(per_id)
    ]


def ids_of(records, split: str) -> set[int]:
    return {r.original_id for r in records if r.split == split}


# --- CUHK-PEDES: the real excerpt ---


def test_cuhk_excerpt_counts_match_its_readme(cuhk_mini):
    records, problems = load_raw_records("cuhk-pedes", cuhk_mini)
    assert problems == []
    stats = split_stats(records)
    counts = {split: (s["identities"], s["images"], s["captions"]) for split, s in stats.items()}
    assert counts == {"train": (5, 20, 40), "val": (1, 4, 8), "test": (2, 8, 16)}
    assert all(s["mean_caption_words"] > 5 for s in stats.values())


def test_cuhk_paths_are_relative_to_root_and_records_are_named(cuhk_mini):
    records, _ = load_raw_records("cuhk-pedes", cuhk_mini)
    assert all(r.file_path.startswith("imgs/") and (cuhk_mini / r.file_path).is_file() for r in records)
    assert records[0].where == "reid_raw.json record 0 (imgs/CUHK01/0005003.png)"
    assert records[0].split == "test" and records[0].original_id == 12555 and len(records[0].captions) == 2


def test_cuhk_excerpt_validates_clean(cuhk_mini):
    result = validate_source("cuhk-pedes", cuhk_mini)
    assert result.problems == []
    assert result.record_indices == list(range(32))
    assert result.clean_records() == result.records and result.skipped() == []


# --- structural problems and unusable input ---


def test_structural_problems_reject_the_record_and_name_it(tmp_path):
    entries = make_entries({"train": [1, 2], "test": [3]}, per_id=1)
    write_source(tmp_path, "reid_raw.json", entries)
    broken = entries + [
        "not a record",
        {"split": "train", "id": 4, "captions": ["x"]},
        {"split": "train", "id": True, "captions": ["x"], "file_path": "a.png"},
        {"split": "train", "id": 5, "captions": "one string", "file_path": "b.png"},
        {"split": "train", "id": 6, "captions": ["x", 7], "file_path": "c.png"},
        {"split": "dev", "id": 7, "captions": ["x"], "file_path": "d.png"},
    ]
    (tmp_path / "reid_raw.json").write_text(json.dumps(broken))
    records, problems = load_raw_records("cuhk-pedes", tmp_path)
    assert len(records) == 3
    assert [(p.record, p.kind) for p in problems] == [
        (3, "wrong-type"),
        (4, "missing-field"),
        (5, "wrong-type"),
        (6, "wrong-type"),
        (7, "wrong-type"),
        (8, "invalid-split"),
    ]
    assert all(p.file == "reid_raw.json" for p in problems)
    assert str(problems[1]).startswith("reid_raw.json record 4: missing-field: ") and "'file_path'" in str(problems[1])


def test_validation_result_skips_every_record_with_a_problem(tmp_path):
    entries = make_entries({"train": [1, 2], "test": [3]}, per_id=1)
    write_source(tmp_path, "reid_raw.json", entries)
    entries[1]["captions"] = [""]
    entries.append({"split": "train", "id": 9})
    (tmp_path / "reid_raw.json").write_text(json.dumps(entries))
    result = validate_source("cuhk-pedes", tmp_path)
    assert [r.original_id for r in result.clean_records()] == [1, 3]
    assert result.skipped() == [
        (1, "reid_raw.json record 1 (imgs/train/0002_0.png)", ["empty-caption"]),
        (3, "reid_raw.json record 3", ["missing-field"]),
    ]


@pytest.mark.parametrize(
    "content, expected",
    [("[{", "not valid JSON"), ('{"records": []}', "expected a JSON list"), (b"\xff\xfe[]", "not UTF-8")],
)
def test_unreadable_annotation_file_is_unusable(tmp_path, content, expected):
    path = tmp_path / "reid_raw.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UnusableInput, match=expected) as caught:
        load_raw_records("cuhk-pedes", tmp_path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_missing_root_or_annotation_file_is_unusable(tmp_path):
    with pytest.raises(UnusableInput, match="no such data set folder"):
        load_raw_records("cuhk-pedes", tmp_path / "absent")
    with pytest.raises(UnusableInput, match="reid_raw.json: no such annotation file"):
        load_raw_records("cuhk-pedes", tmp_path)
    with pytest.raises(UnusableInput, match="other.json: no such annotation file"):
        load_raw_records("cuhk-pedes", tmp_path, "other.json")


def test_annotations_override_is_absolute_cwd_relative_or_root_relative(tmp_path, monkeypatch):
    root = write_source(tmp_path / "data", "custom.json", make_entries({"train": [1], "test": [2]}))
    for given in (root / "custom.json", "custom.json", Path("data") / "custom.json"):
        monkeypatch.chdir(tmp_path)
        loaded = read_source("cuhk-pedes", root, given)
        assert loaded.annotation_file.resolve() == (root / "custom.json").resolve()
        assert len(loaded.records) == 4


def test_bad_arguments_are_programming_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        load_raw_records("market1501", tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        load_raw_records("icfg-pedes", tmp_path, val_fraction=1.0)


# --- ICFG-PEDES: train/test only, val carved from training identities ---

ICFG_IDS = {"train": list(range(100, 120)), "test": [500, 501, 502]}


@pytest.mark.parametrize("annotation_name", LAYOUTS["icfg-pedes"].annotation_names)
def test_icfg_carves_a_seeded_identity_disjoint_val_split(tmp_path, annotation_name):
    root = write_source(tmp_path, annotation_name, make_entries(ICFG_IDS))
    records, problems = load_raw_records("icfg-pedes", root, val_fraction=0.2, seed=3)
    assert problems == []
    train, val, test = (ids_of(records, s) for s in ("train", "val", "test"))
    assert len(val) == 4 and train | val == set(ICFG_IDS["train"]) and not train & val
    assert test == set(ICFG_IDS["test"])
    again, _ = load_raw_records("icfg-pedes", root, val_fraction=0.2, seed=3)
    assert again == records
    carves = [ids_of(load_raw_records("icfg-pedes", root, val_fraction=0.2, seed=s)[0], "val") for s in range(5)]
    assert any(carve != val for carve in carves), "the seed should choose the val identities"


def test_icfg_val_carve_sizes(tmp_path):
    root = write_source(tmp_path, "ICFG-PEDES.json", make_entries(ICFG_IDS, per_id=1))
    def val_count(fraction: float) -> int:
        return len(ids_of(load_raw_records("icfg-pedes", root, val_fraction=fraction)[0], "val"))

    assert {f: val_count(f) for f in (0.0, 0.01, 0.5)} == {0.0: 0, 0.01: 1, 0.5: 10}


def test_icfg_rejects_an_official_val_split(tmp_path):
    root = write_source(tmp_path, "ICFG-PEDES.json", make_entries({"train": [1, 2], "val": [3]}, per_id=1))
    records, problems = load_raw_records("icfg-pedes", root)
    assert [(p.record, p.kind) for p in problems] == [(2, "invalid-split")]


def test_icfg_validates_clean(tmp_path):
    root = write_source(tmp_path, "ICFG_PEDES.json", make_entries(ICFG_IDS))
    result = validate_source("icfg-pedes", root, val_fraction=0.1)
    assert result.problems == []
    assert {s: v["identities"] for s, v in result.stats.items()} == {"train": 18, "val": 2, "test": 3}


# --- RSTPReid: images named by img_path ---


def test_rstpreid_reads_img_path_and_its_own_splits(tmp_path):
    entries = make_entries({"train": [0, 1], "val": [2], "test": [3]}, image_field="img_path")
    root = write_source(tmp_path, "data_captions.json", entries, image_field="img_path")
    result = validate_source("rstpreid", root)
    assert result.problems == []
    assert [r.file_path for r in result.records] == [f"imgs/{e['img_path']}" for e in entries]
    assert {s: v["images"] for s, v in result.stats.items()} == {"train": 4, "val": 2, "test": 2}


def test_rstpreid_requires_img_path(tmp_path):
    root = write_source(tmp_path, "data_captions.json", make_entries({"train": [0]}, per_id=1))
    _, problems = load_raw_records("rstpreid", root)
    assert [p.kind for p in problems] == ["missing-field"] and "'img_path'" in problems[0].message


# --- SynthPedes: CUHK layout plus ground-truth attributes ---


def test_synthpedes_carries_attributes(tmp_path):
    entries = make_entries({"train": [0], "val": [1], "test": [2]}, per_id=1)
    for entry in entries:
        entry["attributes"] = {"top": "red", "pants": "blue"}
    entries[2]["attributes"] = "red top"
    root = write_source(tmp_path, "synthpedes.json", entries)
    records, problems = load_raw_records("synthpedes", root)
    assert [r.attributes for r in records] == [{"top": "red", "pants": "blue"}] * 2
    assert [(p.record, p.kind) for p in problems] == [(2, "wrong-type")]
