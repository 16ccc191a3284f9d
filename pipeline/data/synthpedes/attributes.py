"""Attribute spaces of SynthPedes identities, the colour palette, and identity sampling.

An identity is a flat dict of string attributes (keys in `IDENTITY_KEYS`). A dress is an
upper garment that also covers the lower body: its colour is `upper_color`, and
`lower_type` / `lower_color` are "none". Absent items (no pattern, no bag, no headwear)
have colour "none".

Splits: training identities are sampled freely, except that a few (upper colour, lower
colour) pairs are reserved. Validation and test identities are derived from training
identities by changing one or two attributes (hard negatives). A fraction
`novel_combination_fraction` of them instead get a reserved colour pair. So their
(upper colour, lower colour) combination never occurs in training.
"""

from __future__ import annotations

import numpy as np

# Canonical colour words with their rendered RGB. Confusable pairs (red/pink, blue/purple,
# orange/yellow, brown/beige, white/gray) are close in hue but stay separable in pixels.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 28),
    "white": (238, 238, 235),
    "gray": (128, 128, 128),
    "red": (200, 30, 35),
    "pink": (240, 140, 180),
    "orange": (240, 125, 25),
    "yellow": (240, 210, 45),
    "green": (35, 135, 60),
    "blue": (35, 75, 190),
    "purple": (120, 50, 160),
    "brown": (110, 68, 35),
    "beige": (205, 185, 140),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLOR_RGB)

HAIR_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (22, 18, 16),
    "brown": (95, 58, 32),
    "blonde": (215, 180, 115),
    "gray": (150, 150, 150),
}
SKIN_TONES: dict[str, tuple[int, int, int]] = {
    "light": (236, 200, 172),
    "medium": (198, 148, 108),
    "dark": (118, 80, 56),
}

GENDERS = ("male", "female")
BUILDS = ("slim", "average", "heavy")
HAIR_LENGTHS = ("short", "long")
UPPER_TYPES = ("t-shirt", "shirt", "jacket", "coat", "hoodie", "sweater", "dress")
UPPER_PATTERNS = ("none", "stripes")
LOWER_TYPES = ("pants", "jeans", "shorts", "skirt")
BAG_TYPES = ("none", "backpack", "handbag", "shoulder bag")
HEADWEAR_TYPES = ("none", "cap", "hat")

IDENTITY_KEYS = (
    "gender",
    "build",
    "skin_tone",
    "hair_length",
    "hair_color",
    "upper_type",
    "upper_color",
    "upper_pattern",
    "upper_pattern_color",
    "lower_type",
    "lower_color",
    "shoe_color",
    "bag_type",
    "bag_color",
    "headwear_type",
    "headwear_color",
)
COLOR_KEYS = ("hair_color", "upper_color", "upper_pattern_color", "lower_color", "shoe_color", "bag_color", "headwear_color")

# Relative frequencies, so that common clothing (black pants, blue jeans, white shoes) is common.
_UPPER_WEIGHTS = {"male": (3, 2, 3, 1.5, 2, 1.5, 0), "female": (3, 2, 2, 1.5, 1.5, 1.5, 2.5)}
_LOWER_WEIGHTS = {"male": (3, 3, 1.5, 0), "female": (2, 2.5, 1, 2)}
_BAG_WEIGHTS = {"male": (3, 3, 0.3, 1.5), "female": (2, 2, 2.5, 1.5)}
_HEADWEAR_WEIGHTS = (5, 1.5, 1)
_LONG_HAIR_PROB = {"male": 0.12, "female": 0.7}
_LOWER_COLOR_BIAS = {"black": 3, "blue": 3, "gray": 2}
_JEANS_COLOR_BIAS = {"blue": 8, "black": 3, "gray": 2}
_SHOE_COLOR_BIAS = {"black": 3, "white": 3, "gray": 1.5, "brown": 1.5}
_STRIPES_PROB = 0.2
_RESERVED_PAIR_FRACTION = 0.1
_MAX_TRIES = 10_000


def _pick(rng: np.random.Generator, options, weights=None) -> str:
    options = list(options)
    if weights is None:
        return options[rng.integers(len(options))]
    p = np.asarray(weights, dtype=float)
    return options[rng.choice(len(options), p=p / p.sum())]


def _pick_color(rng: np.random.Generator, bias: dict[str, float] | None = None, exclude: str = "") -> str:
    names = [c for c in COLOR_NAMES if c != exclude]
    weights = [(bias or {}).get(c, 1.0) for c in names]
    return _pick(rng, names, weights)


def _lower_color(rng: np.random.Generator, lower_type: str) -> str:
    return _pick_color(rng, _JEANS_COLOR_BIAS if lower_type == "jeans" else _LOWER_COLOR_BIAS)


def sample_identity(rng: np.random.Generator) -> dict[str, str]:
    gender = _pick(rng, GENDERS)
    upper_type = _pick(rng, UPPER_TYPES, _UPPER_WEIGHTS[gender])
    upper_color = _pick_color(rng)
    striped = rng.random() < _STRIPES_PROB
    if upper_type == "dress":
        lower_type = lower_color = "none"
    else:
        lower_type = _pick(rng, LOWER_TYPES, _LOWER_WEIGHTS[gender])
        lower_color = _lower_color(rng, lower_type)
    bag_type = _pick(rng, BAG_TYPES, _BAG_WEIGHTS[gender])
    headwear_type = _pick(rng, HEADWEAR_TYPES, _HEADWEAR_WEIGHTS)
    return {
        "gender": gender,
        "build": _pick(rng, BUILDS, (1, 2, 1)),
        "skin_tone": _pick(rng, SKIN_TONES),
        "hair_length": "long" if rng.random() < _LONG_HAIR_PROB[gender] else "short",
        "hair_color": _pick(rng, HAIR_COLORS, (4, 3, 1.5, 0.7)),
        "upper_type": upper_type,
        "upper_color": upper_color,
        "upper_pattern": "stripes" if striped else "none",
        "upper_pattern_color": _pick_color(rng, exclude=upper_color) if striped else "none",
        "lower_type": lower_type,
        "lower_color": lower_color,
        "shoe_color": _pick_color(rng, _SHOE_COLOR_BIAS),
        "bag_type": bag_type,
        "bag_color": "none" if bag_type == "none" else _pick_color(rng),
        "headwear_type": headwear_type,
        "headwear_color": "none" if headwear_type == "none" else _pick_color(rng),
    }


def color_pair(identity: dict[str, str]) -> tuple[str, str]:
    return identity["upper_color"], identity["lower_color"]


def identity_key(identity: dict[str, str]) -> tuple[str, ...]:
    return tuple(identity[k] for k in IDENTITY_KEYS)


def attribute_distance(a: dict[str, str], b: dict[str, str]) -> int:
    return sum(a[k] != b[k] for k in IDENTITY_KEYS)


def reserve_color_pairs(rng: np.random.Generator) -> set[tuple[str, str]]:
    """(upper colour, lower colour) pairs that no training identity may wear."""
    pairs = [(u, lo) for u in COLOR_NAMES for lo in COLOR_NAMES]
    count = max(1, round(_RESERVED_PAIR_FRACTION * len(pairs)))
    chosen = rng.choice(len(pairs), size=count, replace=False)
    return {pairs[i] for i in sorted(chosen)}


def _mutations(identity: dict[str, str]) -> list[str]:
    """Attributes that can change alone while keeping the identity consistent."""
    keys = ["build", "hair_length", "hair_color", "upper_color", "shoe_color"]
    if identity["upper_type"] != "dress":
        keys += ["upper_type", "lower_type", "lower_color"]
    if identity["upper_pattern"] != "none":
        keys.append("upper_pattern_color")
    if identity["bag_type"] != "none":
        keys.append("bag_color")
    if identity["headwear_type"] != "none":
        keys.append("headwear_color")
    return keys


def _mutate(identity: dict[str, str], key: str, rng: np.random.Generator) -> dict[str, str]:
    """Change exactly `key` to another valid value."""
    current = identity[key]
    gender = identity["gender"]
    if key == "build":
        options = BUILDS
    elif key == "hair_length":
        options = HAIR_LENGTHS
    elif key == "hair_color":
        options = tuple(HAIR_COLORS)
    elif key == "upper_type":
        options = [t for t, w in zip(UPPER_TYPES, _UPPER_WEIGHTS[gender]) if w and t != "dress"]
    elif key == "lower_type":
        options = [t for t, w in zip(LOWER_TYPES, _LOWER_WEIGHTS[gender]) if w]
    elif key in ("upper_color", "upper_pattern_color"):
        taken = {identity["upper_color"], identity["upper_pattern_color"]}
        options = [c for c in COLOR_NAMES if c not in taken]
    else:
        options = COLOR_NAMES
    options = [o for o in options if o != current]
    return {**identity, key: _pick(rng, options)}


def _derive_hard_negative(source: dict[str, str], rng: np.random.Generator) -> dict[str, str]:
    derived = source
    for _ in range(1 + rng.integers(2)):
        derived = _mutate(derived, _pick(rng, _mutations(derived)), rng)
    return derived


def _derive_novel_pair(
    source: dict[str, str], reserved: list[tuple[str, str]], rng: np.random.Generator
) -> dict[str, str] | None:
    upper, lower = reserved[rng.integers(len(reserved))]
    if source["upper_type"] == "dress" or upper == source["upper_pattern_color"]:
        return None
    return {**source, "upper_color": upper, "lower_color": lower}


def _sample_training(count: int, reserved: set, taken: set, rng: np.random.Generator) -> list[dict[str, str]]:
    identities = []
    for _ in range(_MAX_TRIES * count):
        if len(identities) == count:
            break
        identity = sample_identity(rng)
        if color_pair(identity) in reserved or identity_key(identity) in taken:
            continue
        taken.add(identity_key(identity))
        identities.append(identity)
    return identities


def _sample_derived(
    count: int,
    novel_fraction: float,
    train: list[dict[str, str]],
    reserved: set,
    taken: set,
    rng: np.random.Generator,
) -> list[dict[str, str]]:
    num_novel = round(novel_fraction * count)
    reserved_list = sorted(reserved)
    identities = []
    for _ in range(_MAX_TRIES * count):
        if len(identities) == count:
            break
        source = train[rng.integers(len(train))]
        if len(identities) < num_novel:
            identity = _derive_novel_pair(source, reserved_list, rng)
        else:
            identity = _derive_hard_negative(source, rng)
            if color_pair(identity) in reserved:
                identity = None
        if identity is None or identity_key(identity) in taken:
            continue
        taken.add(identity_key(identity))
        identities.append(identity)
    return identities


def sample_splits(
    num_train: int, num_val: int, num_test: int, novel_fraction: float, seed: int, num_generator: int = 0
) -> dict[str, list[dict[str, str]]]:
    """Identity attributes per split; all combinations are distinct across splits. With
    `num_generator`, also a "generator" pool, sampled like training identities but after the test
    split, so that train/val/test are the same whatever its size."""
    rng = np.random.default_rng([seed, 0x5E7])
    reserved = reserve_color_pairs(rng)
    taken: set = set()
    train = _sample_training(num_train, reserved, taken, rng)
    splits = {
        "train": train,
        "val": _sample_derived(num_val, novel_fraction, train, reserved, taken, rng),
        "test": _sample_derived(num_test, novel_fraction, train, reserved, taken, rng),
    }
    wanted = {"train": num_train, "val": num_val, "test": num_test}
    if num_generator:
        splits["generator"] = _sample_training(num_generator, reserved, taken, rng)
        wanted["generator"] = num_generator
    for split, identities in splits.items():
        if len(identities) != wanted[split]:
            raise RuntimeError(f"synthpedes: could only sample {len(identities)} distinct {split} identities")
    return splits
