"""Find colour attribute phrases bound to a garment or accessory in a free-text caption.

A rule-based parser over the lexicon in `pipeline.text.lexicon` (no tagger is available
offline). Two shapes are recognised:

- attributive: COLOURS [fillers] NOUN, e.g. "a blue and white striped tank top",
  "dark-blue jeans", "black tennis shoes";
- predicative: NOUN [, that/which] BE [all/mostly...] COLOURS, e.g. "his pants are black",
  "a shirt that is red", "shoes which are white and gray".

COLOURS is one or more colour mentions joined by "and", "or", "/", "&" or a comma list
("red, white and blue"). A mention is a colour word with the shade words before it and any
colour words hyphenated or juxtaposed to it: "dark blue", "light-gray", "grey-blue",
"navy blue" are each one mention. A shade word alone ("dark pants", "light colored") is
not a colour, so such phrases are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.text.lexicon import (
    COLOR_CONJUNCTIONS,
    COLOR_FAMILY,
    COPULAS,
    DEGREE_ADVERBS,
    FILLER_PHRASES,
    FILLER_WORDS,
    GARMENT_NOUNS,
    GARMENT_PARTS,
    HAIR_NOUNS,
    POSTPOSED_LINKERS,
    RELATIVE_PRONOUNS,
    SHADE_MODIFIERS,
)

Span = tuple[int, int]

# "tan short." or "black short with ...": a common typo for "shorts", a noun only where a
# noun phrase ends; "white, short receding hair" must stay hair.
_SHORTS_TYPO = "short"
_NOUN_PHRASE_ENDS = frozenset({".", ",", ";", "and", "with", "on", ""})
_ANY_NOUN = GARMENT_NOUNS | HAIR_NOUNS
_FILLERS_NOT_NOUNS = FILLER_WORDS - GARMENT_NOUNS

# Words, numbers, or single punctuation marks; hyphens are their own tokens.
_TOKEN = re.compile(r"[A-Za-z]+|\d+|\S")


@dataclass(frozen=True)
class Token:
    text: str
    lower: str
    span: Span


@dataclass(frozen=True)
class ColorMention:
    """One colour as written ("dark blue", "Grey-blue") and the palette families it names."""

    text: str
    span: Span
    families: frozenset[str]


@dataclass(frozen=True)
class ColorPhrase:
    """A colour group bound to a noun; `colors` has one mention per colour of a multi-colour phrase."""

    text: str
    span: Span
    colors: tuple[ColorMention, ...]
    noun: str
    noun_span: Span

    @property
    def color_span(self) -> Span:
        return self.colors[0].span[0], self.colors[-1].span[1]

    @property
    def families(self) -> frozenset[str]:
        return frozenset().union(*(color.families for color in self.colors))


def word_tokens(caption: str) -> list[Token]:
    return [Token(m.group(), m.group().lower(), m.span()) for m in _TOKEN.finditer(caption)]


def find_color_phrases(caption: str, allow_hair: bool = False) -> list[ColorPhrase]:
    """Colour phrases of garments and accessories (and of hair with `allow_hair`), in text order."""
    parser = _Parser(caption, allow_hair)
    phrases = parser.attributive_phrases()
    taken = {index for phrase in phrases for index in parser.token_range(phrase.color_span)}
    phrases += parser.predicative_phrases(taken)
    return sorted(phrases, key=lambda phrase: phrase.span)


class _Parser:
    """Token-level matching of the two phrase shapes; indices below are token indices."""

    def __init__(self, caption: str, allow_hair: bool):
        self.caption = caption
        self.tokens = word_tokens(caption)
        self.nouns = _ANY_NOUN if allow_hair else GARMENT_NOUNS

    def attributive_phrases(self) -> list[ColorPhrase]:
        phrases, index = [], 0
        while index < len(self.tokens):
            group = self._color_group(index)
            if not group:
                index += 1
                continue
            group_end = group[-1][1]
            noun = self._noun_after(group_end)
            if noun is not None and self._is_head(self.tokens[noun[1] - 1].lower):
                phrases.append(self._phrase(group, noun, first=group[0][0], last=noun[1]))
                index = noun[1]
            else:
                index = group_end
        return phrases

    def predicative_phrases(self, taken: set[int]) -> list[ColorPhrase]:
        phrases = []
        for index, token in enumerate(self.tokens):
            if token.lower not in self.nouns:
                continue
            start = self._after_copula(index + 1)
            group = self._color_group(start) if start is not None else []
            if not group or any(i in taken for i in range(group[0][0], group[-1][1])):
                continue
            if self._noun_after(group[-1][1]) is not None:
                continue  # the colours belong to the noun that follows them
            noun = (self._without_leading_parts(self._compound_start(index), index + 1), index + 1)
            phrases.append(self._phrase(group, noun, first=noun[0], last=group[-1][1]))
        return phrases

    def token_range(self, span: Span) -> range:
        indices = [i for i, token in enumerate(self.tokens) if span[0] <= token.span[0] < span[1]]
        return range(indices[0], indices[-1] + 1)

    def _is_head(self, word: str) -> bool:
        return word in self.nouns or word == _SHORTS_TYPO

    def _phrase(self, group: list[tuple[int, int]], noun: tuple[int, int], first: int, last: int) -> ColorPhrase:
        return ColorPhrase(
            text=self._text(first, last),
            span=self._span(first, last),
            colors=tuple(self._mention(start, end) for start, end in group),
            noun=self._text(*noun),
            noun_span=self._span(*noun),
        )

    def _mention(self, start: int, end: int) -> ColorMention:
        words = [token.lower for token in self.tokens[start:end]]
        families = frozenset(COLOR_FAMILY[word] for word in words if word in COLOR_FAMILY)
        return ColorMention(self._text(start, end), self._span(start, end), families)

    def _span(self, start: int, end: int) -> Span:
        return self.tokens[start].span[0], self.tokens[end - 1].span[1]

    def _text(self, start: int, end: int) -> str:
        first, last = self._span(start, end)
        return self.caption[first:last]

    def _lower(self, index: int) -> str:
        return self.tokens[index].lower if index < len(self.tokens) else ""

    def _color_group(self, index: int) -> list[tuple[int, int]]:
        """Token ranges of the colour mentions joined from `index` on; [] when none starts there."""
        mention = self._color_mention(index)
        group = [mention] if mention else []
        while mention:
            joiner_end, _ = self._joiner(mention[1])
            mention = self._color_mention(joiner_end) if joiner_end else None
            if mention:
                group.append(mention)
        # A comma list must close with "and"/"or"; "black, white socks" joins nothing.
        while len(group) > 1 and self._joined_by_comma_only(group[-2][1]):
            group.pop()
        return group

    def _joiner(self, index: int) -> tuple[int | None, bool]:
        """End of a conjunction between two colours ("and", "-and-", ", and", "/"), if one is there."""
        position = index + 1 if self._lower(index) == "-" else index
        if self._lower(position) not in COLOR_CONJUNCTIONS:
            return None, False
        comma_only = self._lower(position) == ","
        position += 1
        if comma_only and self._lower(position) in {"and", "or"}:
            position, comma_only = position + 1, False
        if self._lower(position) == "-":
            position += 1
        return position, comma_only

    def _joined_by_comma_only(self, index: int) -> bool:
        return self._joiner(index)[1]

    def _color_mention(self, index: int) -> tuple[int, int] | None:
        """Shade words and colour words, possibly hyphenated, ending on a colour word."""
        end, position = None, index
        while self._lower(position) in COLOR_FAMILY or self._lower(position) in SHADE_MODIFIERS:
            if self._lower(position) in COLOR_FAMILY:
                end = position + 1
            position += 1
            if self._lower(position) == "-" and self._is_shade_or_color(position + 1):
                position += 1
        return (index, end) if end is not None else None

    def _is_shade_or_color(self, index: int) -> bool:
        return self._lower(index) in COLOR_FAMILY or self._lower(index) in SHADE_MODIFIERS

    def _noun_after(self, index: int) -> tuple[int, int] | None:
        """Token range of the compound noun after filler words, e.g. "tank top" in "striped tank top"."""
        position = index
        while self._lower(position) not in _ANY_NOUN:
            after_filler = self._after_filler(position)
            if after_filler is None:
                return (position - 1, position) if self._ends_with_shorts_typo(index, position) else None
            position = after_filler
        start = end = position + 1
        while True:
            following = end + 1 if self._lower(end) == "-" else end
            if self._lower(following) not in _ANY_NOUN:
                return self._without_leading_parts(start - 1, end), end
            end = following + 1

    def _ends_with_shorts_typo(self, start: int, position: int) -> bool:
        after_typo = position > start and self._lower(position - 1) == _SHORTS_TYPO
        return after_typo and self._lower(position) in _NOUN_PHRASE_ENDS

    def _after_filler(self, index: int) -> int | None:
        """Index after the filler (word, phrase, hyphen, or comma before a filler) at `index`, if any."""
        word = self._lower(index)
        if word == "-" or (word == "," and self._lower(index + 1) in _FILLERS_NOT_NOUNS):
            return index + 1
        for phrase in FILLER_PHRASES:
            end = self._phrase_end(index, phrase)
            if end is not None:
                return end
        return index + 1 if word in FILLER_WORDS else None

    def _phrase_end(self, index: int, words: tuple[str, ...]) -> int | None:
        for word in words:
            if self._lower(index) == "-":
                index += 1
            if self._lower(index) != word:
                return None
            index += 1
        return index

    def _without_leading_parts(self, start: int, end: int) -> int:
        """Drop garment parts that only modify the head: "sleeve shirt" in "short sleeve shirt" is a shirt."""
        while start < end - 1 and self._lower(start) in GARMENT_PARTS:
            start += 2 if self._lower(start + 1) == "-" else 1
        return start

    def _compound_start(self, index: int) -> int:
        """First token of the compound noun ending at `index` ("tank top", "t-shirt")."""
        start = index
        while start > 0:
            previous = start - 2 if self._lower(start - 1) == "-" else start - 1
            if previous < 0 or self._lower(previous) not in GARMENT_NOUNS:
                return start
            start = previous
        return start

    def _after_copula(self, index: int) -> int | None:
        """Index after "[,] [that|which] is/are [to be] [all|mostly ...]" or after "in"/"color", if present."""
        if self._lower(index) in POSTPOSED_LINKERS:
            return index + 1
        if self._lower(index) == ",":
            index += 1
        if self._lower(index) in RELATIVE_PRONOUNS:
            index += 1
        if self._lower(index) not in COPULAS:
            return None
        index += 1
        if self._lower(index) == "to" and self._lower(index + 1) == "be":
            index += 2
        while self._lower(index) in DEGREE_ADVERBS:
            index += 1
        return index
