"""Tiny random checkpoints in the real transformers classes, for tests: a CLIP with a byte-level BPE
tokenizer, and the captions and tower sizes the model tests build from."""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

CAPTIONS = [
    "A woman in a red coat with a black backpack and white shoes.",
    "The man wears blue jeans, a grey hoodie and carries a bag.",
    "a girl with long hair, a yellow dress",
    "He has a green shirt and black pants",
    "Woman wearing a purple jacket over a white top, dark trousers and sneakers.",
    "A person in an orange vest",
]
TINY = dict(width=32, layers=2, heads=2, patch_size=8, embed_dim=16, max_text_length=16, vocab_size=200)


def byte_level_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def save_tiny_clip(folder: Path) -> Path:
    """A random CLIP checkpoint (square 32x32 images) with a minimal byte-level BPE tokenizer."""
    alphabet = byte_level_alphabet()
    vocab = {token: i for i, token in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    merges = [("a", "n"), ("e", "d</w>"), ("r", "ed</w>")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    special_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, **special_ids),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
