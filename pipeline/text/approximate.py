"""Approximate text generation (online PDG): noisy but still true variants of a caption.

With probability `prob` a caption is changed by one operation, drawn by weight.
- replace. A `fraction` of its replaceable words become a synonym from a domain lexicon, or a
  nearest neighbour in a pretrained word-embedding table (MiniLM's).
- delete. A `fraction` of its deletable words are dropped.
- crop. A contiguous window of (1 - `fraction`) of its words is kept.

Some words are never replaced or deleted. They are colour words, shade words, garment / accessory /
hair nouns, and the words between a colour and its noun ("striped", "leather"). No replacement is a
colour or a garment word either. So a caption never comes to describe other clothes. A crop may cut
a whole phrase away. What remains is a shorter, still true description.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .lexicon import COLOR_FAMILY, FILLER_WORDS, GARMENT_NOUNS, HAIR_NOUNS, SHADE_MODIFIERS

# Words that name a colour, a garment or what qualifies one: never touched, never a replacement.
PROTECTED = frozenset(COLOR_FAMILY) | SHADE_MODIFIERS | GARMENT_NOUNS | HAIR_NOUNS | FILLER_WORDS | frozenset(
    "colour color colored coloured t-shirt grey".split()
)
# Words that carry identity (gender, age, count) or negation: replacing or dropping them could
# make the caption false, so they are kept as they are.
KEPT = frozenset(
    "man men woman women boy girl male female lady gentleman child kid old young no not without "
    "he she his her him hers one two three both left right front back".split()
)

# Function words: their embedding neighbours are other function words ("with" -> "and"), which
# change what a caption says, so they are never replaced (deletion may still drop them).
FUNCTION_WORDS = frozenset(
    """a an the and or but with without for of in on at to from by into onto over under above below
    near behind beside between through across along around about against is are was were be been being
    am has have had do does did this that these those there here it its they them their what which who
    while when where as than then so very too also just some any each every all other another same such
    own only more most less few many much off out up down""".split()
)

# Domain synonyms: every word of a group may stand for every other (single words only).
SYNONYM_GROUPS = (
    ("person", "pedestrian", "individual"),
    ("wearing", "wears", "sporting"),
    ("carrying", "holding", "toting"),
    ("walking", "strolling", "moving"),
    ("pair", "set"),
    ("also", "additionally"),
    ("has", "carries"),
    ("seen", "viewed", "shown"),
    ("dressed", "clothed"),
    ("looking", "facing"),
    ("standing", "waiting"),
    ("toward", "towards"),
    ("camera", "viewer"),
    ("side", "profile"),
)

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_SHAPE = re.compile(r"^[a-z]{3,}$")


@dataclass(frozen=True)
class ApproximateText:
    """A seeded caption perturber; `neighbours` maps a lower-case word to its replacements."""

    prob: float
    fraction: float
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # replace, delete, crop
    neighbours: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __call__(self, caption: str, rng: np.random.Generator) -> str:
        if self.prob <= 0 or rng.random() >= self.prob:
            return caption
        words = caption.split()
        if len(words) < 4:
            return caption
        weights = np.asarray(self.weights, dtype=float)
        operation = ("replace", "delete", "crop")[int(rng.choice(3, p=weights / weights.sum()))]
        return " ".join(getattr(self, f"_{operation}")(words, rng))

    def _count(self, available: int) -> int:
        return min(available, max(1, round(self.fraction * available))) if available else 0

    def _replace(self, words: list[str], rng: np.random.Generator) -> list[str]:
        candidates = [i for i, w in enumerate(words) if self.neighbours.get(_core(w))]
        out = list(words)
        for i in rng.permutation(candidates)[: self._count(len(candidates))]:
            options = self.neighbours[_core(words[i])]
            out[i] = _with_core(words[i], options[int(rng.integers(len(options)))])
        return out

    def _delete(self, words: list[str], rng: np.random.Generator) -> list[str]:
        candidates = [i for i, w in enumerate(words) if _deletable(w)]
        dropped = set(rng.permutation(candidates)[: self._count(len(candidates))].tolist())
        return [w for i, w in enumerate(words) if i not in dropped]

    def _crop(self, words: list[str], rng: np.random.Generator) -> list[str]:
        keep = max(3, len(words) - round(self.fraction * len(words)))
        start = int(rng.integers(len(words) - keep + 1))
        return words[start : start + keep]


def _core(word: str) -> str:
    match = _WORD.search(word)
    return match.group(0).lower() if match else ""


def _with_core(word: str, replacement: str) -> str:
    """`word` with its alphabetic core replaced, keeping punctuation and a leading capital."""
    match = _WORD.search(word)
    core = match.group(0)
    if core[0].isupper():
        replacement = replacement[0].upper() + replacement[1:]
    return word[: match.start()] + replacement + word[match.end() :]


def _deletable(word: str) -> bool:
    core = _core(word)
    return bool(core) and core not in PROTECTED and core not in KEPT and not word.endswith((".", ","))


def is_changeable(word: str) -> bool:
    """Whether a (lower-case) word may be replaced, and a word may replace it."""
    return bool(_SHAPE.match(word)) and word not in PROTECTED and word not in KEPT and word not in FUNCTION_WORDS


def lexicon_neighbours() -> dict[str, tuple[str, ...]]:
    """The domain synonyms, less any word the parser may read as part of a garment phrase
    ("walking" in "walking shoes")."""
    table: dict[str, tuple[str, ...]] = {}
    for group in SYNONYM_GROUPS:
        usable = [w for w in group if w not in PROTECTED]
        for word in usable:
            if len(usable) > 1:
                table[word] = tuple(w for w in usable if w != word)
    return table


def embedding_neighbours(
    words: Iterable[str], vocabulary: Mapping[str, int], embeddings: np.ndarray, *, top_k: int = 3,
    min_similarity: float = 0.5,
) -> dict[str, tuple[str, ...]]:
    """Nearest whole-word neighbours (cosine) of each changeable word in an embedding table.

    `vocabulary` maps a token to its row of `embeddings`; sub-word pieces and protected words are
    never neighbours."""
    allowed = sorted(t for t in vocabulary if is_changeable(t))
    queries = sorted({w for w in words if is_changeable(w) and w in vocabulary})
    if not allowed or not queries:
        return {}
    table = _unit_rows(embeddings[[vocabulary[t] for t in allowed]])
    similarity = _unit_rows(embeddings[[vocabulary[w] for w in queries]]) @ table.T  # one product for all
    result = {}
    for word, row in zip(queries, similarity):
        order = np.argsort(-row, kind="stable")[: top_k + 4]
        chosen = [allowed[i] for i in order if allowed[i] != word and row[i] >= min_similarity]
        chosen = [w for w in chosen if not _same_stem(w, word)][:top_k]
        if chosen:
            result[word] = tuple(chosen)
    return result


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = matrix.astype(np.float32)
    return matrix / (np.linalg.norm(matrix, axis=1, keepdims=True) + 1e-8)


def _same_stem(a: str, b: str) -> bool:
    """Plural / tense variants ("walk", "walks") add nothing and can break grammar."""
    return a.rstrip("s") == b.rstrip("s")


def minilm_word_embeddings(model_dir: str | Path) -> tuple[dict[str, int], np.ndarray]:
    """The input word-embedding table and WordPiece vocabulary of a BERT-style folder (safetensors)."""
    from safetensors.numpy import load_file

    folder = Path(model_dir)
    vocabulary = {line.rstrip("\n"): i for i, line in enumerate((folder / "vocab.txt").read_text().splitlines())}
    weights = load_file(folder / "model.safetensors")
    name = next((k for k in weights if k.endswith("word_embeddings.weight")), None)
    if name is None:
        raise ValueError(f"{folder / 'model.safetensors'} holds no word_embeddings.weight table")
    return vocabulary, weights[name]


def build_approximate_text(
    prob: float, fraction: float, weights: tuple[float, float, float], captions: Iterable[str],
    embedding_dir: str | Path | None = None,
) -> ApproximateText:
    """Lexicon synonyms, plus embedding neighbours of the captions' words when `embedding_dir` is given
    (lexicon entries win where both have a word)."""
    neighbours: dict[str, tuple[str, ...]] = {}
    if embedding_dir is not None:
        words = {_core(w) for caption in captions for w in caption.split()}
        vocabulary, embeddings = minilm_word_embeddings(embedding_dir)
        neighbours.update(embedding_neighbours(words, vocabulary, embeddings))
    neighbours.update(lexicon_neighbours())
    return ApproximateText(prob, fraction, weights, neighbours)
