"""Caption text tools for colour phrases, colour edits and approximate text.

- `color_phrases` finds colour attribute phrases.
- `caption_edit` makes colour edits for proximity data generation.
- `approximate` makes approximate text variants for online PDG.
- `lexicon` holds the word lists they share."""

from pipeline.text.approximate import ApproximateText, build_approximate_text
from pipeline.text.caption_edit import CaptionEdit, ColorChange, edit_caption, edit_captions
from pipeline.text.color_phrases import ColorMention, ColorPhrase, find_color_phrases
from pipeline.text.lexicon import PALETTE

__all__ = [
    "ApproximateText",
    "PALETTE",
    "CaptionEdit",
    "ColorChange",
    "ColorMention",
    "ColorPhrase",
    "build_approximate_text",
    "edit_caption",
    "edit_captions",
    "find_color_phrases",
]
