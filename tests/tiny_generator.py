"""A tiny random Stable-Diffusion-layout generator for tests (the real-size one: real_shapes.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Words the tiny tokenizer knows whole; "|" splits a word into several tokens, so that colour swaps
# with unequal token counts ("red" -> "turquoise") occur in tests as they do with CLIP's real vocabulary.
TINY_WORDS = (
    "a", "the", "man", "woman", "in", "with", "and", "wearing", "jacket", "shirt", "pants", "jeans",
    "shoes", "backpack", "red", "green", "blue", "black", "white", "gray", "yellow", "pink",
    "purple", "brown", "orange", "turqu|oise", "mag|enta",
)


def build_tiny_generator(
    directory: str | Path, *, latent_size: tuple[int, int] = (16, 8), max_tokens: int = 16, seed: int = 0
) -> Path:
    """Saves a tiny random Stable-Diffusion-layout model and returns its folder.

    `latent_size` is (height, width); the VAE downsamples by 2, so images are twice that.
    """
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(TINY_WORDS, max_tokens)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=max_tokens, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        mid_block_add_attention=False,
    )
    unet = UNet2DConditionModel(
        sample_size=latent_size, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
    return Path(directory)


def tiny_tokenizer(words: tuple[str, ...], max_tokens: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with every byte plus the given words ('|' marks token boundaries inside a word)."""
    byte_symbols = list(bytes_to_unicode().values())
    vocab = {symbol: index for index, symbol in enumerate(byte_symbols + [s + "</w>" for s in byte_symbols])}
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = word.split("|")
        for index, piece in enumerate(pieces):
            symbols = list(piece)
            if index == len(pieces) - 1:
                symbols[-1] += "</w>"
            _add_merges(_apply_merges(symbols, ranks), vocab, ranks)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=max_tokens)


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE: merge the best-ranked adjacent pair until none is known."""
    symbols = list(symbols)
    while len(symbols) > 1:
        rank, position = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == len(ranks):
            break
        symbols[position : position + 2] = [symbols[position] + symbols[position + 1]]
    return symbols


def _add_merges(segments: list[str], vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> None:
    """Merges that join a word's current segments left to right. Ranked after every existing merge,
    they fire only once BPE has reached these segments, so earlier words keep their tokens."""
    merged = segments[0]
    for segment in segments[1:]:
        ranks.setdefault((merged, segment), len(ranks))
        merged += segment
        vocab.setdefault(merged, len(vocab))
