"""A caption grammar for SynthPedes: varied, partial, view-aware descriptions of what is visible.

Captions only use palette colour names (plus the spelling "grey") and always bind a colour
to the item that has it, so every colour word in a caption is true of the pictured person.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render import ImageFacts

# View phrases are disjoint between views, so a caption's view can be read back from its words.
VIEW_PHRASES: dict[str, tuple[str, ...]] = {
    "front": ("facing the camera", "seen from the front", "walking toward the camera"),
    "back": ("seen from behind", "walking away from the camera", "turned away from the camera"),
    "side": ("seen from the side", "in profile", "walking past the camera from the side"),
}

_NOUNS = {
    "male": ("man", "man", "guy", "young man", "male pedestrian", "gentleman"),
    "female": ("woman", "woman", "lady", "young woman", "female pedestrian", "girl"),
}
_PRONOUNS = {"male": ("he", "his"), "female": ("she", "her")}
GARMENT_WORDS = {
    "t-shirt": ("t-shirt", "tee", "t-shirt", "short-sleeved shirt", "tee shirt"),
    "shirt": ("shirt", "long-sleeved shirt", "button-up shirt", "shirt"),
    "jacket": ("jacket", "jacket", "zip-up jacket"),
    "coat": ("coat", "long coat", "coat", "overcoat"),
    "hoodie": ("hoodie", "hooded sweatshirt", "hoodie"),
    "sweater": ("sweater", "jumper", "pullover", "sweater"),
    "dress": ("dress", "dress", "knee-length dress"),
    "pants": ("pants", "trousers", "pants", "slacks"),
    "jeans": ("jeans", "jeans", "denim jeans"),
    "shorts": ("shorts", "shorts", "knee-length shorts"),
    "skirt": ("skirt", "skirt", "knee-length skirt"),
    "shoes": ("shoes", "sneakers", "shoes", "trainers"),
    "backpack": ("backpack", "backpack", "rucksack"),
    "handbag": ("handbag", "purse", "handbag", "bag"),
    "shoulder bag": ("shoulder bag", "crossbody bag", "messenger bag", "bag"),
    "cap": ("cap", "baseball cap", "cap"),
    "hat": ("hat", "hat"),
}
_PLURAL = {"pants", "jeans", "shorts", "shoes"}
_CARRY_VERBS = ("carrying", "carrying", "holding", "with")
_WEAR_VERBS = ("wearing", "wearing", "in", "dressed in")
_MENTION_PROB = {"upper": 0.9, "lower": 0.8, "shoes": 0.5, "bag": 0.75, "headwear": 0.75, "hair": 0.45}


def _choose(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _color(name: str, rng: np.random.Generator) -> str:
    return "grey" if name == "gray" and rng.random() < 0.4 else name


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _item(colour: str, kind: str, rng: np.random.Generator) -> str:
    """A noun phrase for one coloured item: 'a red jacket', 'black pants', 'a bag that is blue'."""
    noun = _choose(rng, GARMENT_WORDS[kind])
    roll = rng.random()
    if kind in _PLURAL:
        if roll < 0.8:
            return f"{_color(colour, rng)} {noun}"
        return f"a pair of {_color(colour, rng)} {noun}"
    if roll < 0.8:
        phrase = f"{_color(colour, rng)} {noun}"
        return f"{_article(phrase)} {phrase}"
    return f"{_article(noun)} {noun} that is {_color(colour, rng)}"


def _upper_phrase(a: dict[str, str], rng: np.random.Generator) -> str:
    if a["upper_pattern"] == "none" or rng.random() < 0.3:
        return _item(a["upper_color"], a["upper_type"], rng)
    noun = _choose(rng, GARMENT_WORDS[a["upper_type"]])
    base, stripes = _color(a["upper_color"], rng), _color(a["upper_pattern_color"], rng)
    form = rng.integers(3)
    if form == 0:
        phrase = f"{base} and {stripes} striped {noun}"
    elif form == 1:
        phrase = f"{base} {noun} with {stripes} stripes"
    else:
        phrase = f"striped {base} {noun}"
    return f"{_article(phrase)} {phrase}"


def _hair_phrase(a: dict[str, str], rng: np.random.Generator) -> str:
    colour = _color(a["hair_color"], rng)
    return _choose(rng, (f"{a['hair_length']} {colour} hair", f"{colour} hair", f"{a['hair_length']} hair"))


def _bag_phrase(a: dict[str, str], facts: ImageFacts, rng: np.random.Generator) -> str:
    if facts.bag_visible == "straps":
        return _choose(rng, ("a backpack", f"a backpack with {_color(a['bag_color'], rng)} straps"))
    if a["bag_type"] == "backpack" and rng.random() < 0.3:
        return f"a {_color(a['bag_color'], rng)} backpack on {_PRONOUNS[a['gender']][1]} back"
    return _item(a["bag_color"], a["bag_type"], rng)


def _join(parts: list[str]) -> str:
    if len(parts) <= 2:
        return " and ".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


def _mentions(a: dict[str, str], facts: ImageFacts, rng: np.random.Generator) -> dict[str, str]:
    """Noun phrases for the visible items this caption describes; always a garment."""
    visible = {
        "upper": True,
        "lower": facts.lower_visible,
        "shoes": facts.shoes_visible,
        "bag": facts.bag_visible != "no",
        "headwear": a["headwear_type"] != "none",
        "hair": facts.hair_visible,
    }
    chosen = [k for k, seen in visible.items() if seen and rng.random() < _MENTION_PROB[k]]
    if "upper" not in chosen and "lower" not in chosen:
        chosen.append("upper")
    makers = {
        "upper": lambda: _upper_phrase(a, rng),
        "lower": lambda: _item(a["lower_color"], a["lower_type"], rng),
        "shoes": lambda: _item(a["shoe_color"], "shoes", rng),
        "bag": lambda: _bag_phrase(a, facts, rng),
        "headwear": lambda: _item(a["headwear_color"], a["headwear_type"], rng),
        "hair": lambda: _hair_phrase(a, rng),
    }
    return {k: makers[k]() for k in chosen}


@dataclass
class _Parts:
    """The pieces one caption is assembled from; `worn` is never empty."""

    noun: str  # "man", "lady", ...
    he: str
    worn: list[str]
    bag: str
    hair: str
    view: str  # "" when the caption does not mention the view

    @property
    def person(self) -> str:
        return f"{_article(self.noun)} {self.noun}"


def _worn_items(mentions: dict[str, str], rng: np.random.Generator) -> list[str]:
    order = [k for k in ("upper", "lower", "shoes", "headwear") if k in mentions]
    if rng.random() < 0.3:
        order = [order[i] for i in rng.permutation(len(order))]
    return [mentions[k] for k in order]


def _person_wearing(p: _Parts, rng) -> list[str]:
    """'A man facing the camera, wearing ..., carrying ...'"""
    head = f"{p.person} {p.view}," if p.view else p.person
    text = f"{head} {_choose(rng, _WEAR_VERBS)} {_join(p.worn)}"
    if p.bag:
        text += f", {_choose(rng, _CARRY_VERBS)} {p.bag}"
    return [text] + ([f"{p.he} has {p.hair}"] if p.hair else [])


def _the_person_has(p: _Parts, rng) -> list[str]:
    """'The woman has ... and is wearing ... She is carrying ...'"""
    has_hair = f"has {p.hair} and " if p.hair else ""
    sentences = [f"the {p.noun} {has_hair}is wearing {_join(p.worn)}"]
    if p.bag:
        sentences.append(f"{p.he} is {_choose(rng, ('carrying', 'holding'))} {p.bag}")
    if p.view:
        sentences.append(f"in the picture {p.he} is {p.view}")
    return sentences


def _this_person(p: _Parts, rng) -> list[str]:
    """'This person is dressed in ... She is a young woman with ...'"""
    sentences = [f"this person is dressed in {_join(p.worn)}"]
    extras = [x for x in (p.hair, p.bag) if x]
    if extras:
        sentences.append(f"{p.he} is {p.person} with {_join(extras)}")
    if p.view:
        sentences.append(f"{p.he} is {p.view}")
    return sentences


def _person_in_walks(p: _Parts, rng) -> list[str]:
    """'A young man in a ... walks toward the camera. He also wears ...'"""
    verb = f"is {p.view}" if p.view else _choose(rng, ("walks", "is walking", "stands"))
    sentences = [f"{p.person} in {p.worn[0]} {verb}"]
    if p.worn[1:]:
        sentences.append(f"{p.he} {_choose(rng, ('also wears', 'has on', 'is wearing'))} {_join(p.worn[1:])}")
    if p.bag:
        sentences.append(f"{p.he} carries {p.bag}")
    if p.hair:
        sentences.append(f"{p.he} has {p.hair}")
    return sentences


def _person_with(p: _Parts, rng) -> list[str]:
    """'A lady with long hair and a red handbag is wearing ...'"""
    with_items = [x for x in (p.hair, p.bag) if x]
    head = f"{p.person} with {_join(with_items)}" if with_items else p.person
    sentences = [f"{head} {_choose(rng, ('is wearing', 'wears', 'has on'))} {_join(p.worn)}"]
    if p.view:
        sentences.append(f"the {p.noun} is {p.view}")
    return sentences


def _view_first(p: _Parts, rng) -> list[str]:
    """'Seen from behind, a man in ... He has ...'"""
    opener = f"{p.view}, {p.person}" if p.view else p.person
    sentences = [f"{opener} {_choose(rng, _WEAR_VERBS)} {_join(p.worn)}"]
    if p.bag:
        sentences.append(f"{p.he} has {p.bag}")
    if p.hair:
        sentences.append(f"{p.he} has {p.hair}")
    return sentences


_STRUCTURES = (_person_wearing, _the_person_has, _this_person, _person_in_walks, _person_with, _view_first)


def caption(a: dict[str, str], facts: ImageFacts, rng: np.random.Generator) -> str:
    """One caption of identity `a` as pictured (`facts`)."""
    mentions = _mentions(a, facts, rng)
    he, _ = _PRONOUNS[a["gender"]]
    parts = _Parts(
        noun=_choose(rng, _NOUNS[a["gender"]]),
        he=he,
        worn=_worn_items(mentions, rng),
        bag=mentions.get("bag", ""),
        hair=mentions.get("hair", ""),
        view=_choose(rng, VIEW_PHRASES[facts.view]) if rng.random() < 0.5 else "",
    )
    sentences = _STRUCTURES[rng.integers(len(_STRUCTURES))](parts, rng)
    return " ".join(_capitalise(s) + "." for s in sentences)


def captions_for_image(a: dict[str, str], facts: ImageFacts, count: int, rng: np.random.Generator) -> list[str]:
    """`count` captions, distinct where the grammar allows."""
    captions: list[str] = []
    for _ in range(10 * count):
        text = caption(a, facts, rng)
        if text not in captions:
            captions.append(text)
        if len(captions) == count:
            break
    return captions + captions[-1:] * (count - len(captions))
