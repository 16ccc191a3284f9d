"""DVC stage `prepare`: the configured data source into manifests and shards under data/prepared."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from pipeline.data.prepare import (
    DataProblemsError,
    prepare,
    write_data_metrics,
    write_prepared_contact_sheet,
)
from pipeline.data.validate import UnusableInput
from pipeline.runtime import start_stage

OUT_DIR = Path("data/prepared")
METRICS = Path("metrics/data.json")
CONTACT_SHEET = Path("reports/prepare/contact_sheet.png")

log = logging.getLogger("stages.prepare")


def main() -> int:
    _, params = start_stage(__doc__)
    try:
        shutil.rmtree(OUT_DIR, ignore_errors=True)  # no stale shards from an earlier shard size
        result = prepare(params, OUT_DIR)
    except (DataProblemsError, UnusableInput) as err:
        log.error("%s", err)
        return 1
    write_data_metrics(result, METRICS)
    write_prepared_contact_sheet(result, CONTACT_SHEET, params.synth.contact_sheet_ids, params.data.seed)
    log.info("prepared %s", {split: len(rows) for split, rows in result.records.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
