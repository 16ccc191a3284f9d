"""Person crops as CLIP- and BLIP-style image processors should see them.

Those processors expect square pictures. CLIP's resizes the short side and centre-crops a square.
That cuts a 384x128 person crop down to its waist band, and shoes, hair, hats and legs are gone.
BLIP's resizes to a square without keeping the aspect, stretching the person sideways. Padding
every crop to a square first (centred, on a neutral fill) keeps the whole person, undistorted.
The project's own dual encoder has its own preprocessing and never goes through here.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

GREY = (128, 128, 128)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int] = GREY) -> Image.Image:
    """`image` (as RGB) centred on a square canvas of its longer side, the rest filled with `fill`."""
    image = image.convert("RGB")
    side = max(image.size)
    if image.width == image.height:
        return image
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def processor_fill(processor) -> tuple[int, int, int]:
    """The processor's `image_mean` as an RGB colour (0-255): padding that normalises to about zero.
    A processor holding an image processor (BLIP's) is looked into; grey where none says."""
    processor = getattr(processor, "image_processor", processor)
    mean = getattr(processor, "image_mean", None)
    if not isinstance(mean, Sequence) or len(mean) != 3:
        return GREY
    return tuple(int(round(255 * float(value))) for value in mean)


def padded(images: Sequence[Image.Image], fill: tuple[int, int, int]) -> list[Image.Image]:
    return [pad_to_square(image, fill) for image in images]
