"""DVC stage `index@<variant>`: embed search.gallery with models/<variant>/best and index it (index/<variant>)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline.runtime import inference_device, start_stage
from pipeline.search.build import build_index
from pipeline.search.embed import SearchError
from pipeline.search.gallery import GalleryError

log = logging.getLogger("stages.index")


def main() -> int:
    args, params = start_stage(__doc__, with_variant=True)
    try:
        build_index(params, args.variant, inference_device(), Path("."))
    except (SearchError, GalleryError) as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
