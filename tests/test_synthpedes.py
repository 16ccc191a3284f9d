import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import SynthConfig
from pipeline.data.contact_sheet import write_contact_sheet
from pipeline.data.synthpedes import (
    COLOR_NAMES,
    IDENTITY_KEYS,
    COLOR_RGB,
    VIEW_PHRASES,
    render_generator_pool,
    render_synthpedes,
)
from pipeline.data.synthpedes.attributes import (
    COLOR_KEYS,
    attribute_distance,
    color_pair,
    identity_key,
    sample_identity,
    sample_splits,
)
from pipeline.data.synthpedes.render import render_image

TINY = SynthConfig(
    num_train_ids=12, num_val_ids=4, num_test_ids=6, images_per_id=2, captions_per_image=2, novel_combination_fraction=0.5
)

# Nouns whose preceding colour word must be the colour of one attribute.
_NOUN_COLOR_KEY = {
    **dict.fromkeys(("jeans", "pants", "trousers", "slacks", "shorts", "skirt"), "lower_color"),
    **dict.fromkeys(("shoes", "sneakers", "trainers"), "shoe_color"),
    **dict.fromkeys(("backpack", "rucksack", "handbag", "purse"), "bag_color"),
    **dict.fromkeys(("cap", "hat"), "headwear_color"),
    **dict.fromkeys(
        ("shirt", "t-shirt", "tee", "hoodie", "sweatshirt", "sweater", "jumper", "pullover", "coat", "overcoat", "jacket", "dress"),
        "upper_color",
    ),
    "stripes": "upper_pattern_color",
    "hair": "hair_color",
}
_LOWER_AND_SHOE_WORDS = {"jeans", "pants", "trousers", "slacks", "shorts", "skirt", "shoes", "sneakers", "trainers"}


def _words(text: str) -> list[str]:
    return [w.replace("grey", "gray") for w in re.findall(r"[a-z-]+", text.lower())]


def _records(root: Path) -> list[dict]:
    return json.loads((root / "synthpedes.json").read_text())


def _identities(records: list[dict]) -> dict[int, tuple[str, dict]]:
    return {r["id"]: (r["split"], {k: r["attributes"][k] for k in IDENTITY_KEYS}) for r in records}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    return render_synthpedes(TINY, tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def records(rendered) -> list[dict]:
    return _records(rendered)


def test_sizes_images_and_format(rendered, records):
    num_ids = TINY.num_train_ids + TINY.num_val_ids + TINY.num_test_ids
    assert len(records) == num_ids * TINY.images_per_id
    ids_per_split = {s: {r["id"] for r in records if r["split"] == s} for s in ("train", "val", "test")}
    assert [len(ids_per_split[s]) for s in ("train", "val", "test")] == [12, 4, 6]
    for record in records:
        assert re.fullmatch(rf"{record['split']}/{record['id']:05d}_\d\d\.png", record["file_path"])
        assert len(record["captions"]) == TINY.captions_per_image
        with Image.open(rendered / "imgs" / record["file_path"]) as image:
            assert image.mode == "RGB" and image.size == (TINY.width, TINY.height)


def test_splits_are_identity_disjoint_and_combinations_unique(records):
    identities = _identities(records)
    splits_of_id = {}
    for record in records:
        splits_of_id.setdefault(record["id"], set()).add(record["split"])
    assert all(len(s) == 1 for s in splits_of_id.values())
    combos = [tuple(a[k] for k in IDENTITY_KEYS) for _, a in identities.values()]
    assert len(set(combos)) == len(combos)


def test_output_is_byte_identical_and_seed_dependent(rendered, tmp_path):
    again = render_synthpedes(TINY, tmp_path / "again")
    assert _hashes(again) == _hashes(rendered)
    other = render_synthpedes(SynthConfig(**{**TINY.__dict__, "seed": 1}), tmp_path / "other")
    first_image = "imgs/train/00000_00.png"
    assert _hashes(other)[first_image] != _hashes(rendered)[first_image]


def test_the_generator_pool_is_new_people_and_leaves_the_splits_alone():
    args = (TINY.num_train_ids, TINY.num_val_ids, TINY.num_test_ids, TINY.novel_combination_fraction, TINY.seed)
    splits, with_pool = sample_splits(*args), sample_splits(*args, num_generator=30)
    assert all(with_pool[s] == splits[s] for s in ("train", "val", "test")) and "generator" not in splits
    pool = with_pool["generator"]
    annotated = {identity_key(i) for s in ("train", "val", "test") for i in splits[s]}
    assert len({identity_key(i) for i in pool} | annotated) == len(annotated) + 30
    # the test split's novel colour pairs (never in training) stay novel to the generator too
    novel = {color_pair(i) for i in splits["test"]} - {color_pair(i) for i in splits["train"]}
    assert novel and not novel & {color_pair(i) for i in pool}


def test_the_generator_pool_renders_in_memory_and_deterministically():
    cfg = SynthConfig(**{**TINY.__dict__, "num_generator_ids": 3})
    pool = list(render_generator_pool(cfg))
    assert len(pool) == 3 * TINY.images_per_id
    image, captions, attributes = pool[0]
    assert image.size == (TINY.width, TINY.height) and len(captions) == TINY.captions_per_image
    assert set(IDENTITY_KEYS) <= attributes.keys()
    again = list(render_generator_pool(cfg))
    assert [np.asarray(i).tobytes() for i, _, _ in again] == [np.asarray(i).tobytes() for i, _, _ in pool]
    assert [c for _, c, _ in again] == [c for _, c, _ in pool]
    assert list(render_generator_pool(TINY)) == []


def test_caption_colours_are_true(records):
    for record in records:
        attributes = record["attributes"]
        identity_colors = {attributes[k] for k in COLOR_KEYS}
        for caption in record["captions"]:
            words = _words(caption)
            assert {w for w in words if w in COLOR_RGB} <= identity_colors, caption
            for colour, noun in zip(words, words[1:]):
                if colour in COLOR_RGB and noun in _NOUN_COLOR_KEY:
                    assert attributes[_NOUN_COLOR_KEY[noun]] == colour, caption


def test_captions_mention_a_garment_and_only_visible_items(records):
    garment_words = {w for w, key in _NOUN_COLOR_KEY.items() if key in ("upper_color", "lower_color")}
    for record in records:
        for caption in record["captions"]:
            words = set(_words(caption))
            assert words & garment_words, caption
            if record["attributes"]["occluded"] == "legs":
                assert not words & _LOWER_AND_SHOE_WORDS, caption


def test_captions_vary_in_structure(records):
    captions = [c for r in records for c in r["captions"]]
    openings = {" ".join(c.split()[:2]) for c in captions}
    assert len({c.split()[0] for c in captions}) >= 3
    assert len(openings) >= 6
    assert any("grey" in c for c in captions) and any(re.search(r"\bgray\b", c) for c in captions)


def test_view_words_match_the_view(records):
    mentioned = 0
    for record in records:
        for caption in record["captions"]:
            for view, phrases in VIEW_PHRASES.items():
                if any(p in caption.lower() for p in phrases):
                    assert view == record["attributes"]["view"], caption
                    mentioned += 1
    assert mentioned > 0


def test_test_ids_are_hard_negatives_and_some_colour_pairs_are_novel(records):
    identities = _identities(records)
    train = [a for split, a in identities.values() if split == "train"]
    test = [a for split, a in identities.values() if split == "test"]
    near = [min(attribute_distance(t, a) for a in train) <= 2 for t in test]
    assert sum(near) >= 0.8 * len(test)
    train_pairs = {(a["upper_color"], a["lower_color"]) for a in train}
    novel = [t for t in test if (t["upper_color"], t["lower_color"]) not in train_pairs]
    assert len(novel) >= round(TINY.novel_combination_fraction * TINY.num_test_ids)


def _nearest_palette_colour(rgb: np.ndarray) -> str:
    return min(COLOR_NAMES, key=lambda name: float(np.sum((np.array(COLOR_RGB[name]) - rgb) ** 2)))


def test_upper_garment_colour_is_recognisable_in_pixels():
    rng = np.random.default_rng(123)
    checked = correct = 0
    while checked < 60:
        identity = sample_identity(rng)
        if identity["upper_pattern"] != "none" or identity["bag_type"] == "shoulder bag":
            continue
        image, facts = render_image(identity, "front", 128, 64, rng)
        if facts.occluded != "none":
            continue
        x0, y0, x1, y1 = facts.torso_box
        torso = np.asarray(image, dtype=np.float64)[y0:y1, x0:x1].reshape(-1, 3)
        checked += 1
        correct += _nearest_palette_colour(torso.mean(axis=0)) == identity["upper_color"]
    assert correct >= 0.8 * checked


def test_contact_sheet_is_a_deterministic_png(rendered, records, tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    write_contact_sheet(records, rendered / "imgs", first, num_ids=3, seed=0)
    write_contact_sheet(records, rendered / "imgs", second, num_ids=3, seed=0)
    assert first.read_bytes() == second.read_bytes()
    with Image.open(first) as sheet:
        assert sheet.format == "PNG" and sheet.width > 300 and sheet.height > 300
