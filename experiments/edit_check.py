"""Judging a garment-colour edit with the attribute probe: does the generated image show the new
colour on the edited top or bottom, and the source's colour on the other one?

Only edits the probe can read are judged: a single change recolouring the top or the (visible)
bottom, from the colour the source really has (SynthPedes colour labels). Used by
experiments/attribute_check.py (the probe's verdict on the filter's kept and rejected pairs) and
by benchmarks/bench_pdg.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.text.lexicon import palette_name

from pipeline.generator.probe import LOWER_NOUNS, UPPER_NOUNS, AttributeProbe, predict_colours


# Besides the SynthPedes nouns, words real captions use for a top.
_UPPER_WORDS = frozenset(UPPER_NOUNS) | {"tshirt", "top", "blouse"}
_LOWER_WORDS = frozenset(LOWER_NOUNS)


def garment_of(phrase: str) -> str | None:
    """'upper' or 'lower' when the phrase names a top or a bottom ("a blue zip-up jacket",
    "t-shirt that is gray"), None for anything else (shoes, bags, hats, hair)."""
    words = {word.strip(".,;:!?()\"'").lower() for word in phrase.split()}
    if words & _UPPER_WORDS:
        return "upper"
    if words & _LOWER_WORDS:
        return "lower"
    return None


@dataclass(frozen=True)
class ColourEdit:
    """An edit that recolours one garment the probe can read, with the source's ground truth."""

    garment: str  # "upper" | "lower"
    old_color: str
    new_color: str
    attributes: dict

    @property
    def other_garment(self) -> str:
        return "lower" if self.garment == "upper" else "upper"

    def visible(self, garment: str) -> bool:
        return garment == "upper" or self.attributes.get("lower_visible") == "yes"


def colour_edit(changes: Sequence[dict], attributes: dict) -> tuple[ColourEdit | None, str]:
    """The edit the probe can judge, or None and why not: it must be a single change recolouring
    the top or the (visible) bottom, from the colour that garment really has."""
    if len(changes) != 1:
        return None, "several_changes"
    change = changes[0]
    garment = garment_of(change["phrase_before"])
    if garment is None:
        return None, "not_upper_or_lower_garment"
    edit = ColourEdit(garment, palette_name(change["old_color"]), palette_name(change["new_color"]), attributes)
    if attributes.get(f"{garment}_color") != edit.old_color:
        return None, "old_colour_not_the_garment_colour"
    if not edit.visible(garment):
        return None, "garment_not_visible"
    return edit, ""


def edit_readings(edit: ColourEdit, reading: dict[str, str]) -> tuple[bool, bool | None]:
    """(the edited garment reads as the new colour, the other garment still reads as the source's
    colour; None where the other garment is not visible)."""
    shown = reading[edit.garment] == edit.new_color
    other = edit.other_garment
    kept = reading[other] == edit.attributes[f"{other}_color"] if edit.visible(other) else None
    return shown, kept


def edit_confirmed(edit: ColourEdit, reading: dict[str, str]) -> bool:
    """The probe sees the new colour on the edited garment and nothing else recoloured."""
    shown, kept = edit_readings(edit, reading)
    return shown and kept is not False


def probe_pixels(images: Sequence[Image.Image], probe: AttributeProbe) -> torch.Tensor:
    """Images resized (bicubic, as the probe's training data) to the probe's size, in [-1, 1]."""
    size = (probe.config["width"], probe.config["height"])
    resized = [image.convert("RGB").resize(size, Image.Resampling.BICUBIC) for image in images]
    arrays = [np.asarray(image, dtype=np.float32) for image in resized]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def read_colours(probe: AttributeProbe, images: Sequence[Image.Image]) -> list[dict[str, str]]:
    """The probe's reading {"upper": colour, "lower": colour} of each image."""
    upper, lower = predict_colours(probe, probe_pixels(images, probe))
    return [{"upper": u, "lower": l} for u, l in zip(upper, lower)]


class AttributeChecker:
    """The attribute probe's verdict on each edit: True (it reads the new colour on the edited
    garment, and the other garment unchanged), False, or None (an edit it cannot judge)."""

    def __init__(self, probe: AttributeProbe, attributes_by_source: dict[str, dict]):
        self.probe, self.attributes_by_source = probe, attributes_by_source

    def verdicts(self, records: Sequence[dict], images: Sequence[Image.Image]) -> list[bool | None]:
        verdicts = []
        for record, reading in zip(records, read_colours(self.probe, images)):
            edit, _ = colour_edit(record["changes"], self.attributes_by_source.get(record["source_key"], {}))
            verdicts.append(None if edit is None else edit_confirmed(edit, reading))
        return verdicts
