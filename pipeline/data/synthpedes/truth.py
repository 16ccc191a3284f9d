"""The true answer to a colour edit, from the renderer: SynthPedes knows what every edit should look like.

Every SynthPedes image is a pure function of its identity, its view and an RNG seeded by
(synth.seed, person id, image index), and the identity's colours draw nothing from that RNG.
So re-rendering an image with one colour attribute changed gives the same person, pose, background,
occluder, lighting and sensor noise with only that item recoloured: the true edit of a caption
edit "a red jacket" -> "a green jacket". The same re-rendering makes the known-bad pairs a
generator produces (`KNOWN_BAD`): the image left unchanged, the right item in a wrong colour, the
wrong item recoloured, a blank image, a noise image, and a different person.

Used by the oracle generator (`pdg.method: oracle`, pipeline/pdg/oracle.py) and by the ground-truth
benchmarks of the filter and of the diffusion generator (benchmarks/bench_filter_truth.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data.canonical import ImageRecord
from pipeline.text.lexicon import palette_name

from .attributes import COLOR_NAMES, HAIR_COLORS, IDENTITY_KEYS
from .captions import GARMENT_WORDS
from .render import render_image

KNOWN_BAD = ("unchanged", "wrong_colour", "wrong_garment", "blank", "noise", "different_person")
_RENDER_STREAM = 0  # the stream of pipeline.data.synthpedes that draws an image (not its captions)
_IMAGE_NAME = re.compile(r"(\d+)_(\d+)\.png$")

# caption noun (its last word) -> the item whose colour it names
_ITEM_OF_TYPE = {**{kind: "upper" for kind in ("t-shirt", "shirt", "jacket", "coat", "hoodie", "sweater", "dress")},
                 **{kind: "lower" for kind in ("pants", "jeans", "shorts", "skirt")},
                 "shoes": "shoe", "backpack": "bag", "handbag": "bag", "shoulder bag": "bag",
                 "cap": "headwear", "hat": "headwear"}
ITEM_OF_NOUN = {noun.split()[-1]: _ITEM_OF_TYPE[kind] for kind, nouns in GARMENT_WORDS.items() for noun in nouns}
ITEM_OF_NOUN.update(hair="hair", stripes="upper", straps="bag")  # "white stripes", "a backpack with red straps"
# item -> the colour attributes it may name (an upper garment: its colour or its stripes')
ITEM_KEYS = {"upper": ("upper_color", "upper_pattern_color"), "lower": ("lower_color",), "shoe": ("shoe_color",),
             "bag": ("bag_color",), "headwear": ("headwear_color",), "hair": ("hair_color",)}
KEY_ITEM = {key: item for item, keys in ITEM_KEYS.items() for key in keys}


@dataclass(frozen=True)
class Source:
    """What re-renders one SynthPedes image."""

    key: str
    identity: dict[str, str]
    attributes: dict[str, str]
    view: str
    render_id: int
    index: int
    width: int
    height: int
    seed: int

    @classmethod
    def of(cls, record: ImageRecord, seed: int) -> "Source":
        """The render of a prepared SynthPedes record; ValueError naming the record if it is not one."""
        attributes = json.loads(record.attributes) if record.attributes else {}
        match = _IMAGE_NAME.search(record.image_path)
        if not attributes or match is None or int(match.group(1)) != record.original_id:
            raise ValueError(f"record {record.key} ({record.image_path}) is not a SynthPedes image with attributes: "
                             "the renderer's ground truth exists for data.source synthpedes only")
        return cls(record.key, {k: attributes[k] for k in IDENTITY_KEYS}, attributes, attributes["view"],
                   record.original_id, int(match.group(2)), record.width, record.height, seed)

    def render(self, **colours: str) -> Image.Image:
        """The image with some colour attributes changed (none: the image itself)."""
        identity = {**self.identity, **colours}
        rng = np.random.default_rng([self.seed, self.render_id, self.index, _RENDER_STREAM])
        return render_image(identity, self.view, self.height, self.width, rng)[0]


def edit_target(change: dict, attributes: dict[str, str]) -> tuple[str | None, str]:
    """The colour attribute a caption change recolours, or None and why not (a phrase naming no
    rendered item, or an old colour that is not the item's)."""
    words = [word.strip(".,;:!?()\"'").lower() for word in change["phrase_before"].split()]
    items = {ITEM_OF_NOUN[word] for word in words if word in ITEM_OF_NOUN}
    if len(items) != 1:
        return None, "no_single_item"
    old = palette_name(change["old_color"])
    keys = [key for key in ITEM_KEYS[items.pop()] if attributes.get(key) == old]
    if len(keys) != 1:
        return None, "old_colour_not_the_items" if not keys else "ambiguous_item"
    return keys[0], ""


@dataclass(frozen=True)
class TrueEdit:
    source: Source
    key: str  # the recoloured attribute, e.g. "upper_color"
    old_colour: str
    new_colour: str
    image: Image.Image
    region: np.ndarray  # bool (height, width): the pixels the edit changes

    @property
    def item(self) -> str:
        return KEY_ITEM[self.key]


def changed_region(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).sum(axis=2) > 0


def true_edit(source: Source, changes: Sequence[dict]) -> tuple[TrueEdit | None, str]:
    """The rendered true edit of a single-change caption edit, or None and why not."""
    if len(changes) != 1:
        return None, "not_one_change"
    key, why = edit_target(changes[0], source.attributes)
    if key is None:
        return None, why
    new = palette_name(changes[0]["new_color"])
    if new not in (HAIR_COLORS if key == "hair_color" else COLOR_NAMES):
        return None, "new_colour_not_rendered"
    image = source.render(**{key: new})
    region = changed_region(image, source.render())
    if not region.any():
        return None, "item_not_visible"
    return TrueEdit(source, key, source.attributes[key], new, image, region), ""


def known_bad(kind: str, edit: TrueEdit, rng: np.random.Generator, others: Sequence[Source] = ()) -> Image.Image | None:
    """A wrong image for the edit's caption, of one `KNOWN_BAD` kind; None where the source has none
    of that kind (no other visible item to recolour, no other person in `others`)."""
    source = edit.source
    if kind == "unchanged":
        return source.render()
    if kind == "wrong_colour":
        palette = HAIR_COLORS if edit.key == "hair_color" else COLOR_NAMES
        wrong = [c for c in palette if c not in (edit.old_colour, edit.new_colour)]
        return source.render(**{edit.key: wrong[rng.integers(len(wrong))]})
    if kind == "wrong_garment":
        return _wrong_item(edit, rng)
    if kind == "blank":
        mean = np.asarray(source.render(), dtype=np.float32).mean(axis=(0, 1))
        return Image.new("RGB", (source.width, source.height), tuple(int(v) for v in mean))
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, size=(source.height, source.width, 3), dtype=np.uint8))
    if kind == "different_person":
        people = [other for other in others if other.render_id != source.render_id]
        return people[rng.integers(len(people))].render() if people else None
    raise ValueError(f"unknown kind of known-bad pair {kind!r}; expected one of {KNOWN_BAD}")


def _wrong_item(edit: TrueEdit, rng: np.random.Generator) -> Image.Image | None:
    """Another visible item given the edit's new colour (a top and a bottom first: they are what
    a generator confuses), or None when the person has no other visible item to recolour."""
    source, reference = edit.source, edit.source.render()
    palette = list(COLOR_NAMES)
    keys = [k for k in ("lower_color", "upper_color") if k != edit.key and KEY_ITEM[k] != edit.item]
    keys += [k for k in ("shoe_color", "bag_color", "headwear_color") if k != edit.key]
    for key in keys:
        current = source.attributes.get(key, "none")
        if current == "none":
            continue
        colour = edit.new_colour if edit.new_colour != current and edit.new_colour in palette else None
        if colour is None:
            choices = [c for c in palette if c != current]
            colour = choices[rng.integers(len(choices))]
        image = source.render(**{key: colour})
        if changed_region(image, reference).any():
            return image
    return None
