"""An attribute probe: a small CNN that reads the upper and lower garment colours off an image.

It is a measuring instrument for the generator, trained on real SynthPedes images only (never on
generated ones), at the generator's resolution. `prompted_color_accuracy` generates images from
captions that name a garment colour and counts how often the probe reads the prompted colour.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from pipeline.data.synthpedes import COLOR_NAMES

if TYPE_CHECKING:  # importing the generator (diffusers) takes seconds; the filter stage only reads colours
    from pipeline.generator.data import LabelledImages

UPPER_CLASSES = COLOR_NAMES
LOWER_CLASSES = COLOR_NAMES + ("none",)  # "none": a dress covers the lower body
IGNORE = -100  # a label the loss and the accuracy skip: lower body not visible, or no attributes

# Nouns the SynthPedes captions use for each garment (multi-word ones end in these).
UPPER_NOUNS = ("t-shirt", "tee", "shirt", "sweatshirt", "jacket", "coat", "overcoat", "hoodie", "sweater",
               "jumper", "pullover", "dress")
LOWER_NOUNS = ("pants", "trousers", "slacks", "jeans", "shorts", "skirt")
OTHER_NOUNS = ("shoes", "sneakers", "trainers", "backpack", "rucksack", "bag", "handbag", "purse", "cap", "hat",
               "hair", "straps", "stripes")
_SPELLINGS = {"gray": ("gray", "grey")}

WEIGHTS_FILE, CONFIG_FILE = "probe.safetensors", "probe.json"


class AttributeProbe(nn.Module):
    """Three conv blocks keep a coarse spatial map (upper and lower body sit at different heights)."""

    def __init__(self, height: int = 64, width: int = 32, channels: int = 32):
        super().__init__()
        self.config = {"height": height, "width": width, "channels": channels}
        layers, inputs = [], 3
        for outputs in (channels, 2 * channels, 4 * channels):
            layers += [nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(), nn.MaxPool2d(2)]
            inputs = outputs
        self.features = nn.Sequential(*layers, nn.Flatten())
        flat = inputs * (height // 8) * (width // 8)
        self.hidden = nn.Sequential(nn.Dropout(0.2), nn.Linear(flat, 128), nn.ReLU())
        self.upper = nn.Linear(128, len(UPPER_CLASSES))
        self.lower = nn.Linear(128, len(LOWER_CLASSES))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (upper, lower) for pixels in [-1, 1], resized to the probe's size if need be."""
        size = (self.config["height"], self.config["width"])
        if pixels.shape[-2:] != size:
            pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
        hidden = self.hidden(self.features(pixels))
        return self.upper(hidden), self.lower(hidden)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / WEIGHTS_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "AttributeProbe":
        directory = Path(directory)
        probe = cls(**json.loads((directory / CONFIG_FILE).read_text()))
        probe.load_state_dict(load_file(directory / WEIGHTS_FILE))
        return probe.eval()


def colour_labels(attributes: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Class indices (upper, lower); lower is IGNORE where the lower body is not visible."""
    upper, lower = [], []
    for row in attributes:
        upper.append(UPPER_CLASSES.index(row["upper_color"]) if row.get("upper_color") in UPPER_CLASSES else IGNORE)
        visible = row.get("lower_visible") == "yes" and row.get("lower_color") in LOWER_CLASSES
        lower.append(LOWER_CLASSES.index(row["lower_color"]) if visible else IGNORE)
    return torch.tensor(upper), torch.tensor(lower)


def train_probe(
    images: LabelledImages,
    *,
    epochs: int = 16,
    batch_size: int = 64,
    lr: float = 2e-3,
    channels: int = 32,
    size: tuple[int, int] | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> tuple[AttributeProbe, list[tuple[int, float]]]:
    """Cross-entropy on both heads, on augmented images so that it tolerates the generator's soft
    images. Returns the probe (in eval mode) and (step, loss) per step.
    `size` (height, width) is what the probe looks at. By default it is half the images' size.
    Garment colours need no detail, and the probe trains 4x faster."""
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(images) / batch_size)
    upper, lower = colour_labels(images.attributes)
    height, width = size or (max(8, images.pixels.shape[-2] // 2), max(8, images.pixels.shape[-1] // 2))
    probe = AttributeProbe(height, width, channels)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    probe.train()
    losses = []
    progress = tqdm(range(steps), desc="probe", disable=not show_progress)
    for step in progress:
        index = torch.randint(len(images), (batch_size,), generator=rng)
        pixels = _augment(images.pixels[index], rng)
        upper_logits, lower_logits = probe(pixels)
        loss = _cross_entropy(upper_logits, upper[index]) + _cross_entropy(lower_logits, lower[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append((step, loss.item()))
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return probe.eval(), losses


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if (labels == IGNORE).all():
        return logits.sum() * 0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE)


def _augment(pixels: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Mirror images, softened images (half resolution and back: decoded latents are soft) and noise."""
    flip = torch.rand(len(pixels), generator=rng) < 0.5
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    soft = F.interpolate(F.avg_pool2d(pixels, 2), size=pixels.shape[-2:], mode="bilinear", align_corners=False)
    soften = torch.rand(len(pixels), generator=rng) < 0.5
    pixels = torch.where(soften[:, None, None, None], soft, pixels)
    noise = 0.05 * torch.randn(pixels.shape, generator=rng)
    return (pixels + noise).clamp(-1, 1)


@torch.no_grad()
def predict_colours(probe: AttributeProbe, pixels: torch.Tensor, batch_size: int = 256) -> tuple[list[str], list[str]]:
    """The colour names (upper, lower) the probe reads off images in [-1, 1]."""
    upper, lower = [], []
    for batch in pixels.split(batch_size):
        upper_logits, lower_logits = probe.eval()(batch)
        upper += [UPPER_CLASSES[i] for i in upper_logits.argmax(1).tolist()]
        lower += [LOWER_CLASSES[i] for i in lower_logits.argmax(1).tolist()]
    return upper, lower


def probe_accuracy(probe: AttributeProbe, images: LabelledImages) -> dict[str, float]:
    """Accuracy (%) per head on labelled images; lower counts only images whose lower body is visible."""
    upper_pred, lower_pred = predict_colours(probe, images.pixels)
    upper, lower = colour_labels(images.attributes)
    return {
        "upper": _percent([UPPER_CLASSES[t] == p for t, p in zip(upper.tolist(), upper_pred) if t != IGNORE]),
        "lower": _percent([LOWER_CLASSES[t] == p for t, p in zip(lower.tolist(), lower_pred) if t != IGNORE]),
    }


def _percent(hits: list[bool]) -> float:
    return 100.0 * sum(hits) / len(hits) if hits else float("nan")


@dataclass(frozen=True)
class ColourPrompt:
    """A caption and the garment colours it names (None where it names none)."""

    text: str
    upper: str | None
    lower: str | None


def names_colour(caption: str, colour: str, nouns: tuple[str, ...]) -> bool:
    """Whether the caption binds `colour` to one of the garment `nouns` ("a red hooded sweatshirt",
    "a red and white striped shirt", "a shirt that is red")."""
    words = "|".join(re.escape(w) for w in _SPELLINGS.get(colour, (colour,)))
    garments = "|".join(re.escape(n) for n in nouns)
    any_item = "|".join(re.escape(n) for n in UPPER_NOUNS + LOWER_NOUNS + OTHER_NOUNS)
    # up to four words in between ("and pink striped zip-up"), none of them naming another item
    between = rf"(?:\s+(?!(?:{any_item})\b)[a-z-]+){{0,4}}?"
    before = rf"\b(?:{words})\b{between}\s+(?:{garments})\b"
    after = rf"\b(?:{garments}) that is (?:{words})\b"
    text = caption.lower()
    return re.search(before, text) is not None or re.search(after, text) is not None


def colour_prompts(images: LabelledImages, limit: int | None = None) -> list[ColourPrompt]:
    """Per image, its first caption that names the upper or the lower colour; at most `limit`."""
    prompts = []
    for captions, row in zip(images.captions, images.attributes):
        for caption in captions:
            upper = row.get("upper_color")
            upper = upper if upper in UPPER_CLASSES and names_colour(caption, upper, UPPER_NOUNS) else None
            lower = row.get("lower_color")
            lower = lower if lower in COLOR_NAMES and names_colour(caption, lower, LOWER_NOUNS) else None
            if upper or lower:
                prompts.append(ColourPrompt(caption, upper, lower))
                break
        if limit is not None and len(prompts) >= limit:
            break
    return prompts


def prompted_color_accuracy(
    sd,
    probe: AttributeProbe,
    prompts: list[ColourPrompt],
    *,
    guidance: float,
    steps: int,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """How often (%) the probe reads the prompted upper / lower colour off the generated images."""
    from pipeline.generator.samples import sample_images

    images = sample_images(sd, [p.text for p in prompts], guidance=guidance, steps=steps, seed=seed,
                      batch_size=batch_size)
    upper_pred, lower_pred = predict_colours(probe, images * 2 - 1)
    upper_hits = [p.upper == read for p, read in zip(prompts, upper_pred) if p.upper]
    lower_hits = [p.lower == read for p, read in zip(prompts, lower_pred) if p.lower]
    return {
        "upper": _percent(upper_hits),
        "lower": _percent(lower_hits),
        "upper_prompts": len(upper_hits),
        "lower_prompts": len(lower_hits),
    }
