"""DVC stage `prepare`: the configured data source into manifests and shards (--out)."""

from __future__ import annotations

import logging
import sys

from pipeline.data.prepare import (
    DataProblemsError,
    prepare,
    write_data_metrics,
    write_prepared_contact_sheet,
)
from pipeline.data.validate import UnusableInput
from pipeline.core.io import writing_directory
from pipeline.core.runtime import start_stage

log = logging.getLogger("stages.prepare")


def main() -> int:
    args, params = start_stage("prepare", __doc__, paths=("out", "metrics", "contact_sheet"))
    try:  # a whole new folder (no stale shards from an earlier shard size), swapped in when complete
        with writing_directory(args.out) as staging:
            result = prepare(params, staging)
            # before the swap: a rendered source's images are under the staging folder until then
            write_prepared_contact_sheet(result, args.contact_sheet, params.synth.contact_sheet_ids, params.data.seed)
    except (DataProblemsError, UnusableInput) as err:
        log.error("%s", err)
        return 1
    write_data_metrics(result, args.metrics)
    log.info("prepared %s", {split: len(rows) for split, rows in result.records.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
