"""A CLIP tokenizer trained offline on the training captions, for the embedded generator.

It is a byte-level BPE with CLIP's own normaliser, word splitting and "</w>" end-of-word marker.
Those are taken from `CLIPTokenizer`'s `tokenizers` pipeline. It is learned without a merge limit.
So every word of the corpus ends up as one token. The colour words are added to the corpus and
always do, so a colour swap in a caption swaps exactly one token. Any other word still encodes,
byte by byte. The merges are learned here rather than by `tokenizers.trainers.BpeTrainer`, whose
order among equally frequent pairs changes from run to run. `save_pretrained` writes tokenizer.json
(transformers 5's format), which `CLIPTokenizer.from_pretrained` reads back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

from pipeline.data.synthpedes import COLOR_NAMES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Spellings captions use besides the palette names.
EXTRA_COLOUR_WORDS = ("grey",)

Word = tuple[str, ...]


def colour_words() -> tuple[str, ...]:
    return COLOR_NAMES + EXTRA_COLOUR_WORDS


def train_caption_tokenizer(captions: Iterable[str], max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary holds every word of `captions` and every colour word whole.

    Deterministic: the same captions, in any order, give the same vocabulary and merges.
    """
    words = _word_counts([*captions, *colour_words()])
    merges = _learn_merges(words)
    return CLIPTokenizer(vocab=_vocab_for(merges), merges=merges, model_max_length=max_length)


def _word_counts(texts: list[str]) -> Counter[Word]:
    """Words as CLIP splits them (byte-level symbols, the last one marked "</w>"), with their counts."""
    backend = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[]).backend_tokenizer
    counts: Counter[Word] = Counter()
    for text in texts:
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)):
            counts[(*word[:-1], word[-1] + "</w>")] += 1
    return counts


def _learn_merges(words: Counter[Word]) -> list[tuple[str, str]]:
    """Merges the most frequent adjacent pair (ties: the smallest pair) until every word is one symbol."""
    merges = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = Counter({_merge(word, best): count for word, count in words.items()})


def _merge(word: Word, pair: tuple[str, str]) -> Word:
    merged, index = [], 0
    while index < len(word):
        if word[index : index + 2] == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(word[index])
            index += 1
    return tuple(merged)


def _vocab_for(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Ids in a fixed order: special tokens, every byte symbol alone and word-final (so that unseen
    words never fall back to unknown), then the merged symbols in merge order."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [BOS, EOS, *alphabet, *(symbol + "</w>" for symbol in alphabet), *(left + right for left, right in merges)]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}
