"""Drawing one SynthPedes image: a flat-shaded pedestrian on a cluttered street-like background.

The body is laid out in person units: x is horizontal offset from the body axis and y runs
from the top of the head (0) to the soles (1), both as fractions of the person's height.
Drawing happens at twice the output size and is box-downsampled, which anti-aliases the
edges cheaply. Camera effects (lighting, colour cast, blur, noise) are applied afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .attributes import HAIR_COLORS, COLOR_RGB, SKIN_TONES
from .scene import camera_effects, muted_color, street_background

VIEWS = ("front", "back", "side")
OCCLUSIONS = ("none", "legs", "feet", "pole")
_OCCLUSION_WEIGHTS = (0.8, 0.08, 0.06, 0.06)
_SUPERSAMPLE = 2
_BUILD_WIDTH = {"slim": 0.88, "average": 1.0, "heavy": 1.2}
_SIDE_DEPTH = 0.62  # body depth seen from the side, relative to its width from the front
_LONG_SLEEVES = {"shirt", "jacket", "coat", "hoodie", "sweater"}
_ANKLE_Y = 0.955
# Occluders cover the body from this height down.
_OCCLUDER_TOP = {"legs": 0.55, "feet": 0.86}

Color = tuple[int, int, int]


@dataclass(frozen=True)
class ImageFacts:
    """What the camera saw: used for captions and recorded with the image."""

    view: str
    occluded: str
    lower_visible: bool
    shoes_visible: bool
    bag_visible: str  # "full", "straps" (a backpack from the front) or "no"
    hair_visible: bool
    torso_box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the upper garment's chest area, output pixels


@dataclass(frozen=True)
class _Pose:
    view: str
    facing: int  # +1 or -1: mirrors the figure (side views face left or right)
    arm_angles: tuple[float, float]  # radians from vertical; outward (front/back) or forward (side)
    leg_spread: float
    stride: float


def shade(color: Color, factor: float) -> Color:
    return tuple(int(min(255, max(0, round(v * factor)))) for v in color)


class _Figure:
    """Maps person units to canvas pixels and draws primitives there."""

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, top: float, height: float, facing: int):
        self.draw, self.cx, self.top, self.h, self.facing = draw, cx, top, height, facing

    def px(self, x: float, y: float) -> tuple[float, float]:
        return self.cx + self.facing * x * self.h, self.top + y * self.h

    def polygon(self, points, color: Color) -> None:
        self.draw.polygon([self.px(x, y) for x, y in points], fill=color)

    def ellipse(self, x: float, y: float, rx: float, ry: float, color: Color) -> None:
        (x0, y0), (x1, y1) = self.px(x - rx, y - ry), self.px(x + rx, y + ry)
        self.draw.ellipse([min(x0, x1), y0, max(x0, x1), y1], fill=color)

    def rect(self, x0: float, y0: float, x1: float, y1: float, color: Color) -> None:
        self.polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], color)

    def limb(self, start, end, width: float, color: Color) -> None:
        """A thick segment with rounded ends."""
        self.draw.line([self.px(*start), self.px(*end)], fill=color, width=max(1, round(width * self.h)))
        for x, y in (start, end):
            self.ellipse(x, y, width / 2, width / 2, color)

    def profile(self, rows: list[tuple[float, float]], color: Color, offset: float = 0.0) -> None:
        """A garment outline symmetric about the body axis: rows of (y, half-width)."""
        left = [(offset - w, y) for y, w in rows]
        right = [(offset + w, y) for y, w in reversed(rows)]
        self.polygon(left + right, color)

    def stripes(self, rows, color: Color, offset: float = 0.0, period: float = 0.05, width: float = 0.017) -> None:
        """Horizontal bands clipped to a profile outline."""
        ys = [y for y, _ in rows]
        y = ys[0] + period * 0.6
        while y + width < ys[-1]:
            band = [(y, float(np.interp(y, ys, [w for _, w in rows]))) for y in (y, y + width)]
            self.profile(band, color, offset)
            y += period


def _point_along(start, end, t: float) -> tuple[float, float]:
    return start[0] + (end[0] - start[0]) * t, start[1] + (end[1] - start[1]) * t


class _PersonPainter:
    """Draws one identity in one pose, back to front."""

    def __init__(self, figure: _Figure, identity: dict[str, str], pose: _Pose):
        self.f, self.a, self.pose = figure, identity, pose
        self.side = pose.view == "side"
        width = _BUILD_WIDTH[identity["build"]]
        self.depth = _SIDE_DEPTH if self.side else 1.0
        self.shoulder = 0.115 * width
        self.waist = 0.08 * width + (0.01 if identity["build"] == "heavy" else 0.0)
        self.hip = 0.085 * width + (0.012 if identity["gender"] == "female" else 0.0)
        self.limb_width = 0.052 * width
        self.leg_width = 0.07 * width
        self.skin = SKIN_TONES[identity["skin_tone"]]
        self.hair = HAIR_COLORS[identity["hair_color"]]
        self.upper = COLOR_RGB[identity["upper_color"]]
        self.lower = COLOR_RGB.get(identity["lower_color"], self.upper)
        self.shoe = COLOR_RGB[identity["shoe_color"]]

    def paint(self) -> None:
        self._far_side_items()
        self._legs()
        self._torso()
        self._arms()
        self._head()
        self._bag()

    def _rows(self, rows):
        return [(y, w * self.depth) for y, w in rows]

    def _torso_rows(self, bottom: float) -> list[tuple[float, float]]:
        s, w, hip = self.shoulder, self.waist, self.hip
        rows = [(0.155, s - 0.03), (0.18, s), (0.3, w + 0.005), (0.42, w), (0.5, hip)]
        if bottom > 0.5:
            rows.append((bottom, hip + 0.04 * (bottom - 0.5) / 0.14))
        return self._rows(rows)

    # Legs, lower garment and shoes.
    def _leg_segments(self):
        hip_x = 0.045 * self.depth
        if self.side:
            return [((0.0, 0.5), (-self.pose.stride, _ANKLE_Y)), ((0.0, 0.5), (self.pose.stride, _ANKLE_Y))]
        spread = 0.05 + self.pose.leg_spread
        return [((-hip_x, 0.5), (-spread, _ANKLE_Y)), ((hip_x, 0.5), (spread, _ANKLE_Y))]

    def _legs(self) -> None:
        lower_type = self.a["lower_type"]
        covered = {"pants": 1.0, "jeans": 1.0, "shorts": 0.4}.get(lower_type, 0.0)
        for i, (hip, ankle) in enumerate(self._leg_segments()):
            depth_shade = 0.85 if self.side and i == 0 else 1.0
            self.f.limb(hip, ankle, self.leg_width, shade(self.skin, depth_shade))
            if covered:
                knee = _point_along(hip, ankle, covered)
                width = self.leg_width * (1.15 if lower_type == "shorts" else 1.05)
                self.f.limb(hip, knee, width, shade(self.lower, depth_shade))
            if lower_type == "jeans":
                seam = _point_along(hip, ankle, 0.1)
                self.f.draw.line([self.f.px(*seam), self.f.px(*ankle)], fill=shade(self.lower, 1.3), width=1)
            toe = 0.025 if self.side else 0.0
            self.f.ellipse(ankle[0] + toe, 0.977, 0.05 if self.side else 0.038, 0.024, shade(self.shoe, depth_shade))
        if lower_type in ("pants", "jeans", "shorts"):
            self.f.profile(self._rows([(0.47, self.hip), (0.56, self.hip - 0.01)]), self.lower)
        elif lower_type == "skirt":
            self.f.profile(self._rows([(0.47, self.hip), (0.7, self.hip + 0.06)]), self.lower)

    # Upper garment.
    def _torso(self) -> None:
        upper_type = self.a["upper_type"]
        bottom = {"coat": 0.64, "jacket": 0.52, "hoodie": 0.52, "dress": 0.5}.get(upper_type, 0.5)
        rows = self._torso_rows(bottom)
        if upper_type == "dress":
            rows = rows + self._rows([(0.72, self.hip + 0.07)])
        self.f.profile(rows, self.upper)
        if self.a["upper_pattern"] == "stripes":
            self.f.stripes(rows[1:], COLOR_RGB[self.a["upper_pattern_color"]])
        self._garment_details(upper_type, rows)

    def _garment_details(self, upper_type: str, rows) -> None:
        dark = shade(self.upper, 0.72)
        front = self.pose.view == "front"
        bottom = rows[-1][0]
        if upper_type in ("jacket", "coat") and front:
            self.f.limb((0.0, 0.19), (0.0, bottom - 0.01), 0.008, dark)
        if upper_type == "coat" and front:
            for y in (0.3, 0.4, 0.5):
                self.f.ellipse(0.015, y, 0.008, 0.008, dark)
        if upper_type == "shirt":
            self.f.polygon([(-0.035, 0.155), (0.0, 0.19), (0.035, 0.155), (0.0, 0.17)], dark)
            if front:
                self.f.limb((0.0, 0.19), (0.0, 0.48), 0.006, dark)
        if upper_type == "sweater":
            self.f.profile(rows[-2:], dark)
            self.f.profile([(rows[-1][0] - 0.035, rows[-1][1]), rows[-1]], self.upper)
        if upper_type == "hoodie":
            hood_y = 0.2 if self.pose.view == "back" else 0.165
            self.f.ellipse(-0.03 if self.side else 0.0, hood_y, 0.06 * self.depth, 0.035, dark)
            if front:
                self.f.profile([(0.4, 0.055), (0.47, 0.07)], dark)

    def _arm_segments(self):
        length = 0.33
        joint_x = (self.shoulder - 0.02) * self.depth
        segments = []
        for sign, angle in zip((-1, 1), self.pose.arm_angles):
            if self.side:
                start = (0.0, 0.19)
                end = (np.sin(angle) * length * sign, 0.19 + np.cos(angle) * length)
            else:
                start = (sign * joint_x, 0.19)
                end = (sign * (joint_x + np.sin(angle) * length), 0.19 + np.cos(angle) * length)
            segments.append((start, end))
        return segments

    def _arms(self) -> None:
        segments = self._arm_segments()
        # From the side the far arm is behind the body and drawn before it; see _far_side_items.
        if not self.side:
            self._arm(*segments[0], depth_shade=1.0, holds_bag=False)
        self._arm(*segments[1], depth_shade=1.0, holds_bag=True)

    def _arm(self, start, end, depth_shade: float, holds_bag: bool) -> None:
        long_sleeves = self.a["upper_type"] in _LONG_SLEEVES
        sleeve_end = _point_along(start, end, 0.9 if long_sleeves else 0.35)
        self.f.limb(start, end, self.limb_width, shade(self.skin, depth_shade))
        sleeve_width = self.limb_width * (1.1 if long_sleeves else 1.3)
        self.f.limb(start, sleeve_end, sleeve_width, shade(self.upper, depth_shade))
        if holds_bag and self.a["bag_type"] == "handbag":
            self._handbag(end)

    def _far_side_items(self) -> None:
        """Things behind the body: far arm (side view), long hair hanging down the back."""
        if self.side:
            self._arm(*self._arm_segments()[0], depth_shade=0.82, holds_bag=False)
        if self.a["hair_length"] == "long" and self.pose.view != "back":
            x = -0.035 if self.side else 0.0
            self.f.profile([(0.05, 0.055), (0.26, 0.07 * self.depth)], self.hair, offset=x)

    # Head, hair, headwear.
    def _head(self) -> None:
        view = self.pose.view
        self.f.rect(-0.022, 0.1, 0.022, 0.165, self.skin)
        long_hair = self.a["hair_length"] == "long"
        if view == "back":
            if long_hair:
                self.f.profile([(0.05, 0.055), (0.27, 0.075)], self.hair)
            self.f.ellipse(0.0, 0.062, 0.048, 0.062, self.hair)
        elif view == "front":
            self.f.ellipse(0.0, 0.062, 0.05, 0.063, self.hair)
            self.f.ellipse(0.0, 0.075, 0.042, 0.05, self.skin)
            for x in (-0.017, 0.017):
                self.f.ellipse(x, 0.072, 0.006, 0.005, (35, 25, 20))
        else:
            self.f.ellipse(0.005, 0.065, 0.046, 0.062, self.skin)
            self.f.ellipse(0.044, 0.075, 0.01, 0.01, self.skin)
            self.f.ellipse(-0.012, 0.052, 0.044, 0.05, self.hair)
            self.f.ellipse(0.03, 0.068, 0.006, 0.005, (35, 25, 20))
        self._headwear()

    def _headwear(self) -> None:
        kind = self.a["headwear_type"]
        if kind == "none":
            return
        color = COLOR_RGB[self.a["headwear_color"]]
        if kind == "cap":
            self.f.ellipse(0.0, 0.04, 0.053, 0.04, color)
            self.f.rect(-0.053, 0.04, 0.053, 0.048, color)
            if self.side:
                self.f.polygon([(0.03, 0.04), (0.095, 0.045), (0.09, 0.053), (0.03, 0.05)], shade(color, 0.85))
            elif self.pose.view == "front":
                self.f.ellipse(0.0, 0.05, 0.05, 0.01, shade(color, 0.85))
        else:
            self.f.ellipse(0.0, 0.04, 0.095, 0.014, shade(color, 0.9))
            self.f.polygon([(-0.045, 0.04), (-0.04, 0.0), (0.04, 0.0), (0.045, 0.04)], color)

    # Bags.
    def _bag(self) -> None:
        kind = self.a["bag_type"]
        if kind == "none" or kind == "handbag":
            return
        color = COLOR_RGB[self.a["bag_color"]]
        view = self.pose.view
        s = self.shoulder * self.depth
        if kind == "backpack":
            if view == "front":
                for x in (-s + 0.03, s - 0.03):
                    self.f.limb((x, 0.17), (x * 0.9, 0.36), 0.022, color)
            elif view == "back":
                self.f.rect(-0.075, 0.19, 0.075, 0.42, color)
                self.f.rect(-0.055, 0.33, 0.055, 0.4, shade(color, 0.8))
            else:
                self.f.rect(-s - 0.07, 0.19, -s + 0.01, 0.41, color)
                self.f.limb((-0.005, 0.17), (0.02, 0.33), 0.018, shade(color, 0.85))
        else:  # shoulder bag: strap across the chest, bag at the opposite hip
            self.f.limb((-s + 0.02, 0.17), (s + 0.01, 0.44), 0.016, color)
            self.f.rect(s - 0.025, 0.42, s + 0.055, 0.52, color)

    def _handbag(self, hand) -> None:
        color = COLOR_RGB[self.a["bag_color"]]
        x, y = hand
        self.f.limb((x - 0.02, y + 0.005), (x + 0.02, y + 0.005), 0.008, shade(color, 0.8))
        self.f.rect(x - 0.04, y + 0.02, x + 0.04, y + 0.1, color)


def _sample_pose(view: str, rng: np.random.Generator) -> _Pose:
    if view == "side":
        swing = rng.uniform(0.05, 0.45)
        arm_angles = (swing, -swing * rng.uniform(0.6, 1.0))
    else:
        arm_angles = tuple(rng.uniform(0.04, 0.3, size=2))
    return _Pose(
        view=view,
        facing=1 if rng.random() < 0.5 else -1,
        arm_angles=arm_angles,
        leg_spread=rng.uniform(-0.01, 0.03),
        stride=rng.uniform(0.02, 0.12),
    )


def _draw_occluder(figure: _Figure, occluded: str, rng: np.random.Generator) -> None:
    color = muted_color(rng, 30, 200, saturation=0.3)
    if occluded == "pole":
        x = rng.uniform(-0.06, 0.06)
        figure.rect(x - 0.025, -1.0, x + 0.025, 2.0, color)
    elif occluded in _OCCLUDER_TOP:
        top = _OCCLUDER_TOP[occluded]
        figure.rect(-0.5, top, 0.5, 2.0, color)
        figure.rect(-0.5, top, 0.5, top + 0.02, shade(color, 1.25))


def _facts(identity: dict[str, str], view: str, occluded: str, torso_box) -> ImageFacts:
    bag = identity["bag_type"]
    if bag == "none":
        bag_visible = "no"
    elif bag == "backpack" and view == "front":
        bag_visible = "straps"
    else:
        bag_visible = "full"
    return ImageFacts(
        view=view,
        occluded=occluded,
        lower_visible=occluded != "legs" and identity["lower_type"] != "none",
        shoes_visible=occluded not in ("legs", "feet"),
        bag_visible=bag_visible,
        hair_visible=identity["hair_length"] == "long" or identity["headwear_type"] == "none",
        torso_box=torso_box,
    )


def _chest_box(figure: _Figure) -> tuple[int, int, int, int]:
    """A central chest patch that only the upper garment (and stripes or straps) covers, in output pixels."""
    (xa, y0), (xb, y1) = figure.px(-0.045, 0.24), figure.px(0.045, 0.4)
    return tuple(round(v / _SUPERSAMPLE) for v in (min(xa, xb), y0, max(xa, xb), y1))


def render_image(
    identity: dict[str, str], view: str, height: int, width: int, rng: np.random.Generator
) -> tuple[Image.Image, ImageFacts]:
    """One RGB image of `identity` seen from `view`, with the facts captions may rely on."""
    canvas_w, canvas_h = width * _SUPERSAMPLE, height * _SUPERSAMPLE
    pose = _sample_pose(view, rng)
    person_h = canvas_h * rng.uniform(0.8, 0.95)
    feet = canvas_h * rng.uniform(0.955, 0.995)
    top = feet - person_h
    cx = canvas_w * (0.5 + rng.uniform(-0.1, 0.1))
    image = street_background(canvas_w, canvas_h, feet - 0.12 * person_h, rng)
    figure = _Figure(ImageDraw.Draw(image), cx, top, person_h, pose.facing)
    _PersonPainter(figure, identity, pose).paint()
    occluded = OCCLUSIONS[rng.choice(len(OCCLUSIONS), p=_OCCLUSION_WEIGHTS)]
    _draw_occluder(figure, occluded, rng)
    image = camera_effects(image.resize((width, height), Image.Resampling.BOX), rng)
    return image, _facts(identity, view, occluded, _chest_box(figure))
