"""Caption tokenizers: a WordPiece vocabulary trained on the training captions, and batching."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_caption_tokenizer(captions: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A lowercasing BERT-style WordPiece tokenizer learned from `captions`.

    Deterministic: the same captions give the same vocabulary. The vocabulary may come out
    smaller than `vocab_size` on a small corpus; size the embedding table with `len(tokenizer)`.
    """
    captions = list(captions)
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    # The trainer numbers the "##x" pieces in hash-map order, and merge ties are broken by
    # those numbers (huggingface/tokenizers#1794): pre-registering every "##x" in sorted
    # order makes the numbering, hence the learned vocabulary, reproducible.
    characters = sorted({c for caption in captions for c in normalizer.normalize_str(caption) if not c.isspace()})
    word_pieces = [f"##{c}" for c in characters]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=[*BERT_SPECIAL_TOKENS, *word_pieces], show_progress=False
    )
    trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.normalizer = normalizer
    trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trained.train_from_iterator(captions, trainer=trainer)
    # Rebuilt from the vocabulary alone so that only the BERT tokens are special.
    backend = Tokenizer(models.WordPiece(vocab=trained.get_vocab(), unk_token="[UNK]"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens(list(BERT_SPECIAL_TOKENS))
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def tokenize(tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` [B, max_length], truncated and padded to a fixed length."""
    batch = tokenizer(
        list(captions), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
