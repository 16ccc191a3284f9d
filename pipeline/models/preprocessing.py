"""Image preprocessing without torchvision: resize with PIL, normalise with torch.

The data loader's training augmentation reuses `resize`, `to_tensor` and `normalize`
so that train and test images go through the same resampling and statistics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_MEAN = (0.5, 0.5, 0.5)
VIT_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImagePreprocessor:
    """Maps a PIL image to a float tensor [3, height, width] normalised by mean/std."""

    height: int
    width: int
    mean: tuple[float, float, float] = VIT_MEAN
    std: tuple[float, float, float] = VIT_STD

    def resize(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        if image.size == (self.width, self.height):
            return image
        return image.resize((self.width, self.height), Image.Resampling.BICUBIC)

    @staticmethod
    def to_tensor(image: Image.Image) -> torch.Tensor:
        """RGB uint8 HWC -> float CHW in [0, 1]."""
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def normalize(self, tensor: torch.Tensor) -> torch.Tensor:
        """Works on [3, H, W] and on batches [B, 3, H, W]."""
        mean = torch.tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
        return (tensor - mean) / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_tensor(self.resize(image)))


def pretrained_image_stats(path: str, default_mean, default_std) -> tuple[tuple, tuple]:
    """The checkpoint's own mean/std when its folder has a preprocessor_config.json."""
    config_file = Path(path) / "preprocessor_config.json"
    if not config_file.is_file():
        return tuple(default_mean), tuple(default_std)
    config = json.loads(config_file.read_text())
    return tuple(config.get("image_mean", default_mean)), tuple(config.get("image_std", default_std))
