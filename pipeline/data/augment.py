"""Training augmentation without torchvision: flip, padded random crop, random erasing.

Every random choice comes from a numpy Generator handed in by the caller, so a
sample's augmentation depends only on (seed, epoch, sample index), not on which
process or loader worker happens to decode it. Resizing and normalisation are the
model's own `ImagePreprocessor`, the same as at test time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.models.preprocessing import ImagePreprocessor


@dataclass(frozen=True)
class AugmentConfig:
    flip_prob: float = 0.5
    crop_padding: int = 4  # pixels of zero padding before cropping back to size
    erase_prob: float = 0.5
    erase_area: tuple[float, float] = (0.02, 0.2)  # share of the image an erased box covers


def augmented_tensor(
    preprocessor: ImagePreprocessor, image: Image.Image, rng: np.random.Generator, cfg: AugmentConfig
) -> torch.Tensor:
    pixels = preprocessor.to_tensor(preprocessor.resize(image))
    if rng.random() < cfg.flip_prob:
        pixels = pixels.flip(-1)
    if cfg.crop_padding > 0:
        pixels = _padded_random_crop(pixels, cfg.crop_padding, rng)
    tensor = preprocessor.normalize(pixels)
    if rng.random() < cfg.erase_prob:
        _random_erase(tensor, rng, cfg.erase_area)
    return tensor


def _padded_random_crop(pixels: torch.Tensor, pad: int, rng: np.random.Generator) -> torch.Tensor:
    _, height, width = pixels.shape
    padded = torch.nn.functional.pad(pixels, (pad, pad, pad, pad))
    top, left = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
    return padded[:, top : top + height, left : left + width]


def _random_erase(tensor: torch.Tensor, rng: np.random.Generator, area: tuple[float, float]) -> None:
    """Overwrite a random box (random aspect ratio) with noise, in place."""
    _, height, width = tensor.shape
    for _ in range(10):  # a box that does not fit is redrawn, as in the usual recipe
        target = rng.uniform(*area) * height * width
        aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
        box_h, box_w = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < box_h < height and 0 < box_w < width:
            top, left = int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1))
            noise = rng.standard_normal((tensor.shape[0], box_h, box_w)).astype(np.float32)
            tensor[:, top : top + box_h, left : left + box_w] = torch.from_numpy(noise)
            return
