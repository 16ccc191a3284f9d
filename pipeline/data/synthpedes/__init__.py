"""SynthPedes: a procedurally rendered, captioned pedestrian data set (the embedded default).

`render_synthpedes` writes `synthpedes.json` (CUHK-PEDES annotation records plus an
`attributes` dict per image) and `imgs/<split>/<id:05d>_<n:02d>.png`. Everything is a pure
function of the config. Each image is drawn from an RNG seeded by (seed, identity id, image index),
so output files are byte-identical across runs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from pipeline.core.config import SynthConfig
from pipeline.core.io import write_bytes_atomic

from .attributes import COLOR_NAMES, IDENTITY_KEYS, COLOR_RGB, sample_splits
from .captions import VIEW_PHRASES, captions_for_image
from .render import VIEWS, ImageFacts, render_image

__all__ = ["COLOR_NAMES", "IDENTITY_KEYS", "COLOR_RGB", "VIEW_PHRASES", "render_synthpedes", "render_generator_pool",
           "image_attributes"]

ANNOTATION_FILE = "synthpedes.json"
_RENDER_STREAM, _CAPTION_STREAM, _VIEW_STREAM = 0, 1, 2


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def image_attributes(identity: dict[str, str], facts: ImageFacts) -> dict[str, str]:
    """The identity's attributes plus what this image shows of them."""
    return {
        **identity,
        "view": facts.view,
        "occluded": facts.occluded,
        "lower_visible": _yes_no(facts.lower_visible),
        "shoes_visible": _yes_no(facts.shoes_visible),
        "bag_visible": facts.bag_visible,
        "hair_visible": _yes_no(facts.hair_visible),
    }


def _views(seed: int, person_id: int, count: int) -> list[str]:
    """Cycle through the views from a random start, so every identity is seen from several sides."""
    start = np.random.default_rng([seed, person_id, _VIEW_STREAM]).integers(len(VIEWS))
    return [VIEWS[(start + n) % len(VIEWS)] for n in range(count)]


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _render_identity(cfg: SynthConfig, person_id: int, identity: dict):
    """The identity's images, each with its captions and attributes."""
    for n, view in enumerate(_views(cfg.seed, person_id, cfg.images_per_id)):
        image, facts = render_image(
            identity, view, cfg.height, cfg.width, np.random.default_rng([cfg.seed, person_id, n, _RENDER_STREAM])
        )
        captions = captions_for_image(identity, facts, cfg.captions_per_image,
                                      np.random.default_rng([cfg.seed, person_id, n, _CAPTION_STREAM]))
        yield n, image, captions, image_attributes(identity, facts)


def _identity_records(cfg: SynthConfig, split: str, person_id: int, identity: dict, image_dir: Path) -> list[dict]:
    records = []
    for n, image, captions, attributes in _render_identity(cfg, person_id, identity):
        file_path = f"{split}/{person_id:05d}_{n:02d}.png"
        write_bytes_atomic(image_dir / file_path, _png_bytes(image))
        records.append({"split": split, "captions": captions, "file_path": file_path, "id": person_id,
                        "attributes": attributes})
    return records


def render_generator_pool(cfg: SynthConfig):
    """The `num_generator_ids` identities only the PDG generator learns from, rendered in memory:
    (image, captions, attributes) per image. Their person ids follow the test split's, so their
    images are drawn from their own seeds."""
    splits = sample_splits(cfg.num_train_ids, cfg.num_val_ids, cfg.num_test_ids, cfg.novel_combination_fraction,
                           cfg.seed, num_generator=cfg.num_generator_ids)
    first_id = cfg.num_train_ids + cfg.num_val_ids + cfg.num_test_ids
    for person_id, identity in enumerate(splits.get("generator", []), start=first_id):
        for _, image, captions, attributes in _render_identity(cfg, person_id, identity):
            yield image, captions, attributes


def render_synthpedes(cfg: SynthConfig, out_dir: str | Path) -> Path:
    """Render the data set described by `cfg` into `out_dir`; returns `out_dir`."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "imgs"
    splits = sample_splits(cfg.num_train_ids, cfg.num_val_ids, cfg.num_test_ids, cfg.novel_combination_fraction, cfg.seed)
    records: list[dict] = []
    person_id = 0
    for split, identities in splits.items():
        (image_dir / split).mkdir(parents=True, exist_ok=True)
        for identity in identities:
            records += _identity_records(cfg, split, person_id, identity, image_dir)
            person_id += 1
    payload = json.dumps(records, sort_keys=True, indent=1, ensure_ascii=True) + "\n"
    write_bytes_atomic(out_dir / ANNOTATION_FILE, payload.encode("utf-8"))
    return out_dir
