"""Token alignment between a source caption and its word-swapped edit, for Prompt-to-Prompt.

Both prompts are tokenised exactly as the text encoder sees them (padded to the tokenizer's max
length). The changed words are located by character spans through the tokenizer's offsets. Tokens
outside the changed words are the same text in both prompts and map one to one, shifted by the
difference in token count once past a swap. The swap region is resampled. Source token i of n_s
spreads its attention over edited tokens k of n_e in proportion to how much the intervals
[i/n_s, (i+1)/n_s) and [k/n_e, (k+1)/n_e) overlap. So "red" (1 token) hands half its map to each of
"turqu" and "oise". The attention of every pixel still sums to one after the mapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

Span = tuple[int, int]  # [start, end) character offsets in a caption


@dataclass(frozen=True)
class TokenAlignment:
    """How the edited prompt's tokens relate to the source prompt's.

    `mapper[s, e]` is the share of source token s's attention that edited token e receives.
    """

    source_tokens: list[int]  # token positions of the changed words in the source prompt
    edited_tokens: list[int]  # token positions of their replacements in the edited prompt
    mapper: torch.Tensor  # (max_tokens, max_tokens)


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> dict:
    """The text encoder's tokenisation (max-length padding, truncation) with character offsets."""
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_offsets_mapping=True,
    )


def tokens_in_span(tokenizer: PreTrainedTokenizerBase, prompt: str, span: Span) -> list[int]:
    """Positions of the tokens whose characters overlap `span`; special tokens have empty offsets."""
    start, end = span
    offsets = tokenize_prompt(tokenizer, prompt)["offset_mapping"]
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]


def align_word_swap(
    tokenizer: PreTrainedTokenizerBase,
    source_prompt: str,
    edited_prompt: str,
    edit_spans: Sequence[tuple[Span, Span]],
) -> TokenAlignment:
    """Alignment for swapped words given as (source span, edited span) pairs, in caption order."""
    length = tokenizer.model_max_length
    source_regions = [tokens_in_span(tokenizer, source_prompt, source) for source, _ in edit_spans]
    edited_regions = [tokens_in_span(tokenizer, edited_prompt, edited) for _, edited in edit_spans]
    if not all(source_regions) or not all(edited_regions):
        raise ValueError(f"an edited word is past the tokenizer's {length} tokens: {edited_prompt!r}")
    mapper = torch.zeros(length, length)
    source_position = edited_position = 0
    for source_region, edited_region in zip(source_regions, edited_regions):
        shared = source_region[0] - source_position
        if edited_region[0] - edited_position != shared:
            raise ValueError("the text between swapped words must be the same in both captions")
        _map_one_to_one(mapper, source_position, edited_position, shared)
        mapper[source_region[0] : source_region[-1] + 1, edited_region[0] : edited_region[-1] + 1] = (
            resample_matrix(len(source_region), len(edited_region))
        )
        source_position, edited_position = source_region[-1] + 1, edited_region[-1] + 1
    _map_one_to_one(mapper, source_position, edited_position, length - source_position)
    return TokenAlignment(
        source_tokens=[i for region in source_regions for i in region],
        edited_tokens=[i for region in edited_regions for i in region],
        mapper=mapper,
    )


def resample_matrix(num_source: int, num_edited: int) -> torch.Tensor:
    """(num_source, num_edited) interval-overlap weights; every row sums to one."""
    source_edges = torch.arange(num_source + 1) / num_source
    edited_edges = torch.arange(num_edited + 1) / num_edited
    low = torch.maximum(source_edges[:-1, None], edited_edges[None, :-1])
    high = torch.minimum(source_edges[1:, None], edited_edges[None, 1:])
    return (high - low).clamp(min=0) * num_source


def _map_one_to_one(mapper: torch.Tensor, source_start: int, edited_start: int, count: int) -> None:
    """Maps `count` tokens from `source_start` on; when the edited prompt is longer, the source's last
    padding tokens have no place left and go to its final position, so no attention is dropped."""
    last = mapper.shape[1] - 1
    for offset in range(count):
        mapper[source_start + offset, min(edited_start + offset, last)] += 1.0
