"""A contact sheet for eyeballing any captioned person data set.

It has one row per identity, with its images side by side and its captions wrapped beside them.
It works on plain annotation records (`split`, `captions`, `file_path` relative to the image
root, `id`), so it serves SynthPedes and the real benchmarks alike. The PNG is byte-identical
for the same input. The identities are picked by a seeded RNG, and no timestamp or
software tag is written.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.core.io import writing_file  # noqa: E402

_MAX_IMAGES_PER_ROW = 6
_IMAGE_WIDTH_IN = 0.9
_TEXT_WIDTH_IN = 6.5
_ROW_HEIGHT_IN = 1.9
_WRAP_CHARS = 120
_FONT_SIZE = 6
_DPI = 110


def _group_by_identity(records: list[dict]) -> dict[tuple[str, int], list[dict]]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for record in records:
        groups.setdefault((record["split"], record["id"]), []).append(record)
    return groups


def _pick_identities(groups: dict, num_ids: int, seed: int) -> list[tuple[str, int]]:
    keys = sorted(groups)
    chosen = np.random.default_rng(seed).choice(len(keys), size=min(num_ids, len(keys)), replace=False)
    return [keys[i] for i in sorted(chosen)]


def _caption_text(images: list[dict]) -> str:
    lines = []
    for n, record in enumerate(images, start=1):
        for text in record["captions"]:
            lines.append(textwrap.fill(f"[{n}] {text}", width=_WRAP_CHARS, subsequent_indent="     "))
    return "\n".join(lines)


def write_contact_sheet(records: list[dict], image_root: Path, path: Path, num_ids: int, seed: int = 0) -> Path:
    """Draw `num_ids` identities chosen with `seed` from `records` into the PNG at `path`."""
    groups = _group_by_identity(records)
    keys = _pick_identities(groups, num_ids, seed)
    columns = min(_MAX_IMAGES_PER_ROW, max(len(groups[k]) for k in keys))
    width_ratios = [_IMAGE_WIDTH_IN] * columns + [_TEXT_WIDTH_IN]
    fig, axes = plt.subplots(
        len(keys),
        columns + 1,
        figsize=(sum(width_ratios), _ROW_HEIGHT_IN * len(keys)),
        gridspec_kw={"width_ratios": width_ratios, "wspace": 0.05, "hspace": 0.25},
        squeeze=False,
    )
    for row, key in zip(axes, keys):
        images = groups[key][:columns]
        for ax in row:
            ax.axis("off")
        for ax, record in zip(row, images):
            with Image.open(Path(image_root) / record["file_path"]) as image:
                ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
        split, person_id = key
        row[0].set_title(f"{split} id {person_id}", fontsize=_FONT_SIZE + 1, loc="left")
        row[-1].text(0.0, 1.0, _caption_text(images), fontsize=_FONT_SIZE, va="top", ha="left", wrap=False)
    try:
        with writing_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.1, metadata={"Software": None})
    finally:
        plt.close(fig)
    return Path(path)
