"""Edit one colour of a garment or accessory in a caption ("a red jacket" -> "a green jacket").

The edit makes these choices. See `color_phrases` for what counts as a phrase.
- Multi-colour phrases ("a blue and white striped shirt") change ONE of their colours. The new
  colour is one that none of the phrase's colours names, so the pattern stays two-coloured.
- A shade belongs to its colour. "dark blue", "light-gray" and "navy blue" are replaced as a
  whole by a plain palette colour ("dark blue jeans" -> "green jeans").
- The new colour comes from a palette of families and differs from the old colour's family.
  "navy" never becomes "blue", and "grey" never "gray".
- Capitalisation is kept ("Red shirt" -> "Green shirt"), and "a"/"an" before the colour follows it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.text.color_phrases import ColorMention, ColorPhrase, Span, find_color_phrases
from pipeline.text.lexicon import PALETTE

_ARTICLE_BEFORE = re.compile(r"\b(an?)(\s+)$", re.IGNORECASE)
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class ColorChange:
    """One replaced colour; spans and word indices refer to the edited caption."""

    phrase_before: str
    phrase_after: str
    old_color: str
    new_color: str
    changed_spans: tuple[Span, ...]
    changed_words: tuple[int, ...]
    # The whole replaced text (colour, and its article when that changed) in each caption:
    # what an image editor swaps word for word.
    source_span: Span
    edited_span: Span

    def to_json(self) -> dict:
        return {
            "phrase_before": self.phrase_before,
            "phrase_after": self.phrase_after,
            "old_color": self.old_color,
            "new_color": self.new_color,
            "changed_spans": [list(span) for span in self.changed_spans],
            "changed_words": list(self.changed_words),
            "source_span": list(self.source_span),
            "edited_span": list(self.edited_span),
        }


@dataclass(frozen=True)
class CaptionEdit:
    source: str
    edited: str
    changes: tuple[ColorChange, ...]

    @property
    def changed_words(self) -> tuple[int, ...]:
        return tuple(sorted(index for change in self.changes for index in change.changed_words))

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "edited": self.edited,
            "changes": [change.to_json() for change in self.changes],
            "changed_words": list(self.changed_words),
        }


@dataclass(frozen=True)
class _Replacement:
    """Text to put over `span` of the source: the colour, and the article before it if that changes."""

    phrase: ColorPhrase
    color: ColorMention
    new_color: str
    span: Span
    text: str
    parts: tuple[tuple[int, int], ...]  # changed pieces, as offsets inside `text`


def edit_caption(
    caption: str,
    rng: np.random.Generator,
    palette: Sequence[str] = PALETTE,
    num_edits: int = 1,
    allow_hair: bool = False,
) -> CaptionEdit | None:
    """Change the colour of `num_edits` different phrases (fewer if the caption has fewer); None if none."""
    phrases = [phrase for phrase in find_color_phrases(caption, allow_hair) if _new_colors(phrase, palette)]
    if not phrases:
        return None
    picked = [phrases[i] for i in sorted(rng.permutation(len(phrases))[:num_edits])]
    choices = []
    for phrase in picked:
        options = _options(phrase, palette)
        choices.append(options[rng.integers(len(options))])
    return _apply(caption, choices)


def edit_captions(
    captions: Sequence[str],
    num: int,
    seed: int,
    palette: Sequence[str] = PALETTE,
    allow_hair: bool = False,
) -> list[list[CaptionEdit]]:
    """Up to `num` distinct single-colour edits of each caption (one list per caption, maybe empty).

    Distinct edits go to different phrases first, then to other colours of the same phrases.
    Each caption has its own RNG seeded by (seed, index), so its edits do not depend
    on the other captions of the list.
    """
    return [_distinct_edits(caption, num, np.random.default_rng([seed, index]), palette, allow_hair)
            for index, caption in enumerate(captions)]


def _distinct_edits(
    caption: str, num: int, rng: np.random.Generator, palette: Sequence[str], allow_hair: bool
) -> list[CaptionEdit]:
    phrases = [phrase for phrase in find_color_phrases(caption, allow_hair) if _new_colors(phrase, palette)]
    shuffled = [_shuffled(_options(phrases[i], palette), rng) for i in rng.permutation(len(phrases))]
    return [_apply(caption, [choice]) for choice in _round_robin(shuffled)[:num]]


def _new_colors(phrase: ColorPhrase, palette: Sequence[str]) -> list[str]:
    families = phrase.families
    return [color for color in palette if color not in families]


def _options(phrase: ColorPhrase, palette: Sequence[str]) -> list[tuple[ColorPhrase, ColorMention, str]]:
    new_colors = _new_colors(phrase, palette)
    return [(phrase, color, new) for color in phrase.colors for new in new_colors]


def _shuffled(items: list, rng: np.random.Generator) -> list:
    return [items[i] for i in rng.permutation(len(items))]


def _round_robin(lists: list[list]) -> list:
    longest = max((len(items) for items in lists), default=0)
    return [items[i] for i in range(longest) for items in lists if i < len(items)]


def _apply(caption: str, choices: list[tuple[ColorPhrase, ColorMention, str]]) -> CaptionEdit:
    replacements = sorted((_replacement(caption, *choice) for choice in choices), key=lambda r: r.span)
    pieces, changes, cursor, shift = [], [], 0, 0
    for replacement in replacements:
        pieces += [caption[cursor : replacement.span[0]], replacement.text]
        cursor = replacement.span[1]
        start = replacement.span[0] + shift
        changes.append((replacement, tuple((start + a, start + b) for a, b in replacement.parts), shift))
        shift += len(replacement.text) - (replacement.span[1] - replacement.span[0])
    edited = "".join(pieces) + caption[cursor:]
    return CaptionEdit(caption, edited, tuple(_change(caption, edited, *change) for change in changes))


def _replacement(caption: str, phrase: ColorPhrase, color: ColorMention, new_color: str) -> _Replacement:
    start, end = color.span
    text = _match_case(new_color, color.text)
    article = _ARTICLE_BEFORE.search(caption[:start])
    if article and article.group(1).lower() != _article_for(new_color):
        fixed = _match_case(_article_for(new_color), article.group(1))
        text = fixed + article.group(2) + text
        start = article.start()
        colour_offset = len(fixed) + len(article.group(2))
        parts = ((0, len(fixed)), (colour_offset, len(text)))
    else:
        parts = ((0, len(text)),)
    return _Replacement(phrase, color, new_color, (start, end), text, parts)


def _change(caption: str, edited: str, replacement: _Replacement, spans: tuple[Span, ...], shift: int) -> ColorChange:
    """Describe one replacement; `shift` is how far earlier replacements moved it in the edited text."""
    before_start = min(replacement.phrase.span[0], replacement.span[0])
    before_end = replacement.phrase.span[1]
    growth = len(replacement.text) - (replacement.span[1] - replacement.span[0])
    return ColorChange(
        phrase_before=caption[before_start:before_end],
        phrase_after=edited[before_start + shift : before_end + shift + growth],
        old_color=replacement.color.text,
        new_color=replacement.new_color,
        changed_spans=spans,
        changed_words=_word_indices(edited, spans),
        source_span=replacement.span,
        edited_span=(replacement.span[0] + shift, replacement.span[0] + shift + len(replacement.text)),
    )


def _word_indices(text: str, spans: tuple[Span, ...]) -> tuple[int, ...]:
    """Indices of the whitespace-separated words of `text` that overlap any of `spans`."""
    words = [match.span() for match in _WORD.finditer(text)]
    return tuple(i for i, (a, b) in enumerate(words) if any(a < end and start < b for start, end in spans))


def _article_for(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _match_case(word: str, model: str) -> str:
    if len(model) > 1 and model.isupper():
        return word.upper()
    return word.capitalize() if model[0].isupper() else word
