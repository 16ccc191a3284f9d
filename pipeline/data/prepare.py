"""The `prepare` stage's work: any source in, the canonical form out.

SynthPedes is first rendered into the CUHK-PEDES annotation layout, so every
source then goes through the same validation and canonicalisation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.config import Params
from pipeline.core.io import write_json_atomic
from pipeline.data.canonical import (
    SPLITS,
    ImageRecord,
    RawRecord,
    assign_person_ids,
    image_key,
    manifest_path,
    write_manifest,
    write_split_shards,
)
from pipeline.data.contact_sheet import write_contact_sheet
from pipeline.data.synthpedes import render_synthpedes
from pipeline.data.validate import ValidationResult, split_stats, validate_source

log = logging.getLogger(__name__)


class DataProblemsError(RuntimeError):
    """The source has bad records and `data.skip_bad_records` is off."""


@dataclass(frozen=True)
class PrepareResult:
    records: dict[str, list[ImageRecord]]
    image_root: Path
    stats: dict
    skipped: list
    converted_to_rgb: dict = field(default_factory=dict)  # per split: non-RGB images written as RGB


def source_root(params: Params, out_dir: Path) -> Path:
    """Where the source's annotation file and `imgs/` live (SynthPedes: rendered now)."""
    if params.data.source == "synthpedes":
        log.info("rendering SynthPedes into %s", out_dir / "synthpedes")
        return render_synthpedes(params.synth, out_dir / "synthpedes")
    if not params.data.root:
        raise DataProblemsError(f"params: 'data.root' must name the {params.data.source} folder")
    return Path(params.data.root)


def canonical_records(
    raw: list[RawRecord], root: Path, source: str, permute_seed: int | None = None
) -> dict[str, list[ImageRecord]]:
    """Contiguous person ids and keys per split, in annotation order.

    Person ids follow the order of first appearance in the annotations. With `permute_seed`, records
    come in a random order drawn from it, one draw per split. The keys are then numbered in that
    order, so that shards and manifests list them as they are numbered."""
    by_split = {}
    for position, split in enumerate(SPLITS):
        pids = assign_person_ids(raw, split)
        rows = [r for r in raw if r.split == split]
        if not rows:
            raise DataProblemsError(f"{source}: the {split} split has no usable records")
        if permute_seed is not None:
            order = np.random.default_rng((permute_seed, position)).permutation(len(rows))
            rows = [rows[i] for i in order]
        by_split[split] = [_image_record(r, i, pids[r.original_id], root, source) for i, r in enumerate(rows)]
    return by_split


def _image_record(raw: RawRecord, index: int, person_id: int, root: Path, source: str) -> ImageRecord:
    with Image.open(root / raw.file_path) as image:  # header only: validation already decoded it
        width, height = image.size
    return ImageRecord(
        key=image_key(raw.split, index),
        person_id=person_id,
        original_id=raw.original_id,
        split=raw.split,
        captions=list(raw.captions),
        image_path=raw.file_path,
        source=source,
        width=width,
        height=height,
        attributes=json.dumps(raw.attributes, sort_keys=True) if raw.attributes else "",
    )


def _checked_records(validation: ValidationResult, skip_bad: bool, source: str) -> list[RawRecord]:
    if validation.problems and not skip_bad:
        for problem in validation.problems:
            log.error("%s", problem)
        raise DataProblemsError(
            f"{source}: {len(validation.problems)} problem(s) found (listed above); fix the data "
            "or set data.skip_bad_records: true to skip those records"
        )
    if validation.problems:
        log.warning("skipping %d bad record(s) (data.skip_bad_records)", len(validation.skipped()))
    return validation.clean_records()


def prepare(params: Params, out_dir: str | Path) -> PrepareResult:
    """Validate the configured source and write manifests, shards and the report under `out_dir`."""
    out_dir = Path(out_dir)
    root = source_root(params, out_dir)
    annotations = params.data.annotations or None
    validation = validate_source(
        params.data.source, root, annotations, val_fraction=params.data.val_fraction, seed=params.data.seed
    )
    clean = _checked_records(validation, params.data.skip_bad_records, params.data.source)
    permute_seed = params.data.seed if params.data.permute_records else None
    records = canonical_records(clean, root, params.data.source, permute_seed)
    converted = {}
    for split, rows in records.items():
        write_manifest(rows, manifest_path(out_dir, split))
        written = write_split_shards(rows, root, out_dir, split, params.data.shard_size)
        converted[split] = written.converted_to_rgb
        log.info("%s: %d images in %d shard(s)%s", split, len(rows), len(written.paths),
                 f", {written.converted_to_rgb} converted to RGB" if written.converted_to_rgb else "")
    skipped = [
        {"record": index, "where": where, "problems": kinds} for index, where, kinds in validation.skipped()
    ]
    stats = split_stats(clean)
    report = {"source": params.data.source, "stats": stats, "skipped": skipped}
    if any(converted.values()):  # only then: an all-RGB source (SynthPedes) keeps its report's bytes
        report["converted_to_rgb"] = converted
    write_json_atomic(out_dir / "report.json", report)
    return PrepareResult(records=records, image_root=root, stats=stats, skipped=skipped, converted_to_rgb=converted)


def write_data_metrics(result: PrepareResult, path: str | Path) -> None:
    write_json_atomic(Path(path), {"splits": result.stats, "skipped_records": len(result.skipped),
                                   "converted_to_rgb": result.converted_to_rgb})


def write_prepared_contact_sheet(result: PrepareResult, path: str | Path, num_ids: int, seed: int) -> None:
    """A sheet of test identities, the split a reader judges retrieval on."""
    rows = [
        {"split": r.split, "captions": r.captions, "file_path": r.image_path, "id": r.original_id}
        for r in result.records["test"]
    ]
    write_contact_sheet(rows, result.image_root, Path(path), num_ids, seed=seed)
