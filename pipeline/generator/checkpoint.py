"""Where the generator lives: the embedded one as a folder, or a pointer to a pretrained checkpoint.

The embedded one is saved as a StableDiffusionPipeline folder. A pointer names a pretrained
checkpoint, which `resolve_generator` hands to the stages after train_generator."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionPipeline,
)

from pipeline.core.io import BrokenArtifact, rerun_hint


log = logging.getLogger(__name__)


POINTER_FILE = "pretrained.json"  # in the generator folder when params name a pretrained checkpoint

def save_pipeline(sd: StableDiffusionPipeline, directory: str | Path) -> Path:
    sd.save_pretrained(directory)
    return Path(directory)


def write_pretrained_pointer(directory: str | Path, pretrained: str) -> Path:
    """Marks `directory` as standing for a pretrained checkpoint instead of holding a trained model."""
    path = Path(directory) / POINTER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pretrained": pretrained}, indent=2) + "\n")
    return path


def load_pretrained_pipeline(name: str, device: torch.device | str = "cpu") -> StableDiffusionPipeline:
    """A pretrained Stable Diffusion folder or hub id (as `pipeline.core.hub` allows), without safety
    checker, with a DDIM scheduler as the embedded model samples with; float16 on a GPU."""
    from pipeline.core.hub import pretrained_kwargs
    from pipeline.core.devices import inference_dtype

    device = torch.device(device)
    sd = StableDiffusionPipeline.from_pretrained(name, safety_checker=None, requires_safety_checker=False,
                                                       dtype=inference_dtype(device), **pretrained_kwargs(name))
    sd.scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    for module in (sd.vae, sd.unet, sd.text_encoder):
        module.eval().requires_grad_(False)
    return sd.to(device)


PERSON_SIZE = (512, 192)  # (height, width) of a person-shaped sample from a 512-pixel Stable Diffusion


def pretrained_sample_size(sd: StableDiffusionPipeline) -> tuple[int, int]:
    """(height, width) to sample a pretrained model at: person-shaped (PERSON_SIZE) for a model of
    Stable Diffusion 1.x's 64-latent size, else the model's own size."""
    size = sd.unet.config.sample_size
    if size == 64:
        return PERSON_SIZE
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return height * sd.vae_scale_factor, width * sd.vae_scale_factor


def resolve_generator(directory: str | Path) -> str:
    """What to give `load_generator`: the pretrained checkpoint the folder points at, or the folder."""
    pointer = Path(directory) / POINTER_FILE
    if pointer.is_file():
        return json.loads(pointer.read_text())["pretrained"]
    missing = [name for name in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json")
               if not (Path(directory) / name).is_file()]
    if missing:
        raise BrokenArtifact(f"{directory}: not a generator folder (no {', '.join(missing)}): {rerun_hint(directory)}")
    return str(directory)
