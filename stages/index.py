"""DVC stage `index@<variant>`: embed search.gallery with models/<variant>/best and index it (index/<variant>)."""

from __future__ import annotations

import logging
import sys

from pipeline.core.devices import inference_device
from pipeline.core.runtime import start_stage
from pipeline.search.build import IndexPaths, build_index
from pipeline.search.embed import SearchError
from pipeline.search.gallery import GalleryError

log = logging.getLogger("stages.index")


def main() -> int:
    args, params = start_stage("index", __doc__, with_variant=True, paths=("model", "prepared", "index", "metrics", "timing"))
    try:
        build_index(params, args.variant, inference_device(), IndexPaths(args.model, args.prepared, args.index, args.metrics, args.timing))
    except (SearchError, GalleryError) as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
