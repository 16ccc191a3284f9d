"""DVC stage `caption`: training texts and identities for the kept proximity images.

The stage reads data/pdg/filtered and data/prepared (train) and writes data/pdg/train. That folder
holds the original training shards, the proximity shards and one manifest of both. `train@pdg`
trains on it. Counts go to metrics/caption.json. Among them are the machine captions added and those
dropped for giving the edited garment its old colour (with caption.captioner set).
"""

from __future__ import annotations

import logging
import sys

from pipeline.data.canonical import list_shards, manifest_path, read_manifest
from pipeline.core.io import write_json_atomic
from pipeline.pdg.captioning import ImageCaptioner, proximity_rows, read_kept, write_training_set
from pipeline.pdg.shards import pdg_shards
from pipeline.core.devices import inference_device
from pipeline.core.runtime import start_stage

log = logging.getLogger("stages.caption")


def main() -> int:
    args, params = start_stage("caption", __doc__, paths=("prepared", "filtered", "out", "metrics"))
    cfg = params.caption
    if not args.filtered.is_dir():
        log.error("no %s: run `dvc repro filter` first", args.filtered)
        return 1
    kept = read_kept(pdg_shards(args.filtered))
    original = read_manifest(manifest_path(args.prepared, "train"))
    first_id = max(row.person_id for row in original) + 1
    device = inference_device()
    try:
        captioner = ImageCaptioner(cfg.captioner, cfg.captioner_max_tokens, device) if cfg.captioner else None
    except (OSError, ValueError) as err:
        log.error("params: 'caption.captioner' %r could not be loaded as an image-to-text model: %s", cfg.captioner, err)
        return 1
    rows, machine = proximity_rows(kept, first_id, cfg, captioner)
    counts = write_training_set(args.prepared, original, kept, rows, args.out, params.data.shard_size)
    counts.update(machine)
    counts["shards"] = len(list_shards(args.out, "train"))
    counts["captioner"] = cfg.captioner or None
    write_json_atomic(args.metrics, counts)
    log.info("training set in %s: %s", args.out, counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
