"""What surrounds a SynthPedes person: the street-like background behind it and the camera effects
(blur, lighting, colour cast, sensor noise) applied to the finished image. Both draw from the
image's own RNG, in the order render_image calls them."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Color = tuple[int, int, int]


def muted_color(rng: np.random.Generator, lo: float = 40, hi: float = 220, saturation: float = 0.45) -> Color:
    color = rng.uniform(lo, hi, size=3)
    gray = color.mean()
    return tuple(int(v) for v in gray + (color - gray) * saturation)


def street_background(width: int, height: int, ground_y: float, rng: np.random.Generator) -> Image.Image:
    top, bottom, ground = (np.array(muted_color(rng)) for _ in range(3))
    t = np.linspace(0.0, 1.0, height)[:, None]
    rows = top * (1 - t) + bottom * t
    rows[int(ground_y) :] = ground * (1 - 0.3 * t[int(ground_y) :])
    pixels = np.broadcast_to(rows[:, None, :], (height, width, 3)).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 7)):
        color = muted_color(rng, saturation=rng.uniform(0.2, 0.8))
        x0, x1 = sorted(rng.uniform(-0.2, 1.2, size=2) * width)
        y0, y1 = sorted(rng.uniform(-0.2, 0.9, size=2) * height)
        shape = rng.integers(3)
        if shape == 0:
            draw.rectangle([x0, y0, x1, y1], fill=color)
        elif shape == 1:
            draw.ellipse([x0, y0, x1, y1], fill=color)
        else:
            draw.line([x0, y0, x1, y1], fill=color, width=int(rng.integers(2, 8)))
    return image


def camera_effects(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    if rng.random() < 0.4:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    pixels = np.asarray(image, dtype=np.float32)
    height, width, _ = pixels.shape
    brightness = rng.uniform(0.85, 1.12)
    slope = rng.uniform(-0.15, 0.15)
    gain = brightness * (1.0 + slope * (np.linspace(-0.5, 0.5, width)[None, :, None]))
    cast = rng.uniform(0.95, 1.05, size=3)
    noise = rng.normal(0.0, rng.uniform(0.0, 5.0), size=pixels.shape)
    pixels = pixels * gain * cast + noise
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
