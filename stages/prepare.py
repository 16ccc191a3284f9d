"""DVC stage `prepare`: the configured data source into manifests and shards (--out)."""

from __future__ import annotations

import logging
import shutil
import sys

from pipeline.data.prepare import (
    DataProblemsError,
    prepare,
    write_data_metrics,
    write_prepared_contact_sheet,
)
from pipeline.data.validate import UnusableInput
from pipeline.runtime import start_stage

log = logging.getLogger("stages.prepare")


def main() -> int:
    args, params = start_stage(__doc__, paths=("out", "metrics", "contact_sheet"))
    try:
        shutil.rmtree(args.out, ignore_errors=True)  # no stale shards from an earlier shard size
        result = prepare(params, args.out)
    except (DataProblemsError, UnusableInput) as err:
        log.error("%s", err)
        return 1
    write_data_metrics(result, args.metrics)
    write_prepared_contact_sheet(result, args.contact_sheet, params.synth.contact_sheet_ids, params.data.seed)
    log.info("prepared %s", {split: len(rows) for split, rows in result.records.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
