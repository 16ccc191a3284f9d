"""Caption text tools: colour attribute phrases and colour edits for proximity data generation."""

from pipeline.text.caption_edit import CaptionEdit, ColorChange, edit_caption, edit_captions
from pipeline.text.color_phrases import ColorMention, ColorPhrase, find_color_phrases
from pipeline.text.lexicon import PALETTE

__all__ = [
    "PALETTE",
    "CaptionEdit",
    "ColorChange",
    "ColorMention",
    "ColorPhrase",
    "edit_caption",
    "edit_captions",
    "find_color_phrases",
]
