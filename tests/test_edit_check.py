"""Judging garment-colour edits with an attribute probe (experiments/edit_check.py), and the attribute
check of the filter's kept and rejected pairs (experiments/attribute_check.py)."""

import io
import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from experiments.attribute_check import agreement, attribute_check, markdown
from experiments.edit_check import AttributeChecker, colour_edit, edit_confirmed, garment_of, palette_name, read_colours
from pipeline.core.config import FilterConfig
from pipeline.data.canonical import write_tar_atomic
from pipeline.data.synthpedes import COLOR_RGB
from pipeline.generator.probe import LOWER_CLASSES, UPPER_CLASSES
from pipeline.pdg.filtering import read_generated, write_kept
from tiny_project import fixed_calibration

TORSO, LEGS = (slice(14, 34), slice(8, 24)), (slice(34, 58), slice(10, 22))
SOURCE = {"upper_color": "red", "lower_color": "blue", "lower_visible": "yes"}


def _person(upper: str, lower: str, background: int = 120) -> np.ndarray:
    image = np.full((64, 32, 3), background, dtype=np.uint8)
    image[TORSO] = COLOR_RGB[upper]
    image[LEGS] = COLOR_RGB[lower]
    return image


class PaletteProbe(torch.nn.Module):
    """Reads the torso and leg colours of `_person` images exactly: logits are minus the distance
    of the region's mean colour to each palette colour."""

    config = {"height": 64, "width": 32}

    def forward(self, pixels):
        rgb = (pixels + 1) * 127.5
        palette = torch.tensor([COLOR_RGB[name] for name in UPPER_CLASSES], dtype=torch.float32)
        upper = -torch.cdist(rgb[:, :, TORSO[0], TORSO[1]].mean((2, 3)), palette)
        lower = -torch.cdist(rgb[:, :, LEGS[0], LEGS[1]].mean((2, 3)), palette)
        return upper, torch.cat([lower, torch.full((len(pixels), 1), -1e6)], 1)  # never "none"


def _change(phrase_before: str, old: str, new: str) -> dict:
    return {"phrase_before": phrase_before, "old_color": old, "new_color": new}


def test_garments_and_colour_words():
    assert garment_of("t-shirt that is gray") == "upper" and garment_of("a red hooded sweatshirt") == "upper"
    assert garment_of("blue jeans") == "lower" and garment_of("white backpack") is None
    assert palette_name("Grey") == "gray" and palette_name("maroon") == "red"
    assert len(LOWER_CLASSES) == len(UPPER_CLASSES) + 1


def test_only_single_visible_garment_edits_from_the_true_colour_are_judged():
    assert colour_edit([_change("red shirt", "red", "green")], SOURCE)[0].garment == "upper"
    assert colour_edit([_change("red shirt", "red", "green")] * 2, SOURCE) == (None, "several_changes")
    assert colour_edit([_change("red shoes", "red", "green")], SOURCE) == (None, "not_upper_or_lower_garment")
    assert colour_edit([_change("pink shirt", "pink", "green")], SOURCE) == (None, "old_colour_not_the_garment_colour")
    hidden = {**SOURCE, "lower_visible": "no"}
    assert colour_edit([_change("blue jeans", "blue", "black")], hidden) == (None, "garment_not_visible")


def test_an_edit_is_confirmed_when_the_new_colour_shows_and_nothing_else_changed():
    edit, _ = colour_edit([_change("red shirt", "red", "green")], SOURCE)
    probe = PaletteProbe()
    readings = read_colours(probe, [Image.fromarray(_person(u, l)) for u, l in
                                    (("green", "blue"), ("red", "blue"), ("green", "green"))])
    assert readings[0] == {"upper": "green", "lower": "blue"}
    assert [edit_confirmed(edit, r) for r in readings] == [True, False, False]
    # the other garment counts only where it is visible
    hidden_legs, _ = colour_edit([_change("red shirt", "red", "green")], {**SOURCE, "lower_visible": "no"})
    assert edit_confirmed(hidden_legs, readings[2])


class _TorsoScorer:
    """Embeds an image by its torso colour and a caption by the last colour word it names."""

    def embed_images(self, images):
        rows = [np.asarray(image, dtype=np.float32)[TORSO].mean(axis=(0, 1)) for image in images]
        return torch.nn.functional.normalize(torch.tensor(np.array(rows)) + 1e-3, dim=-1)

    def embed_texts(self, texts):
        rows = []
        for text in texts:
            colour = [word for word in text.replace(".", "").split() if word in COLOR_RGB][-1]
            rows.append(torch.nn.functional.normalize(torch.tensor(COLOR_RGB[colour], dtype=torch.float32) + 1e-3, dim=0))
        return torch.stack(rows)


def _shard(tmp_path):
    """Four edits of four red-shirted sources: right, not done, spilled onto the jeans, and shoes."""
    cases = {
        "right": (_person("green", "blue"), "shirt"),
        "not-done": (_person("red", "blue"), "shirt"),
        "spilled": (_person("green", "green"), "shirt"),
        "shoes": (_person("green", "blue", background=121), "shoes"),
    }
    samples = []
    for key, (image, item) in cases.items():
        record = {"source_key": f"src-{key}", "source_caption": f"a man in a red {item}",
                  "edited_caption": f"a man in a green {item}", "changes": [_change(f"red {item}", "red", "green")]}
        samples.append({"__key__": key, "png": _png(image), "json": json.dumps(record).encode()})
    write_tar_atomic(tmp_path / "pdg-000000.tar", samples)
    sources = {f"src-{key}": _png(_person("red", "blue")) for key in cases}
    checker = AttributeChecker(PaletteProbe(), {key: SOURCE for key in sources})
    return read_generated([str(tmp_path / "pdg-000000.tar")]), sources, checker


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_check_says_how_often_kept_and_rejected_edits_are_right(tmp_path):
    samples, sources, checker = _shard(tmp_path)
    cfg, calibration = FilterConfig(), fixed_calibration(0.05, 0.5)
    pairs, check = attribute_check(samples, sources, _TorsoScorer(), cfg, calibration, checker)
    undone = ["consistency_margin", "consistency_similarity"]  # a red shirt, captioned green
    assert {p.key: p.reasons for p in pairs} == {"right": [], "not-done": undone, "spilled": [], "shoes": []}
    assert check["judged"] == 3 and check["not_judged"] == 1
    assert check["not_judged_because"] == {"not_upper_or_lower_garment": 1}  # the shoes
    assert check["judged_kept"] == 2 and check["judged_rejected"] == 1
    assert check["confirmed_percent"] == {"all": 33.33, "kept": 50.0, "rejected": 0.0}
    # the right edit's margin beats the undone one's and ties the spilled one's (same torso): (1 + 0.5) / 2
    assert check["margin_auc"] == 0.75
    assert "| 4 | 3 (2 / 1) | 33.33 | 50.00 | 0.00 | 0.7500 |" in markdown({"pairs": 4, "attribute_check": check})
    # with the filter off every pair is kept: the rejected group is empty
    _, unfiltered = attribute_check(samples, sources, _TorsoScorer(), FilterConfig(enabled=False), calibration, checker)
    assert unfiltered["judged_kept"] == 3 and unfiltered["confirmed_percent"]["rejected"] is None


def test_the_check_agrees_with_what_the_filter_stage_wrote(tmp_path):
    samples, sources, checker = _shard(tmp_path)
    pairs, _ = attribute_check(samples, sources, _TorsoScorer(), FilterConfig(), fixed_calibration(0.05, 0.5), checker)
    write_kept(pairs, tmp_path / "filtered", shard_size=2)
    assert agreement(pairs, tmp_path / "filtered", enabled=True) == {
        "kept_keys_agree": True, "stage_kept": 3, "kept": 3, "max_score_difference": 0.0}
    stricter, _ = attribute_check(samples, sources, _TorsoScorer(), FilterConfig(), fixed_calibration(0.9, 0.5), checker)
    assert not agreement(stricter, tmp_path / "filtered", enabled=True)["kept_keys_agree"]


def test_the_filter_stage_does_not_read_the_probe():
    repo = Path(__file__).resolve().parents[1]
    filter_stage = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["filter"]
    assert not [dep for dep in filter_stage["deps"] if "probe" in dep or "edit_check" in dep]
    assert "probe" not in (repo / "pipeline" / "pdg" / "filtering.py").read_text()
