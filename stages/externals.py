"""DVC stage `externals`: digests of the folders and hub ids that params name outside the repository.

It writes one file per consuming stage under --out (see pipeline/externals.py). The stage always runs.
A consumer reruns only when its file's bytes change."""

from __future__ import annotations

import sys

from pipeline.externals import write_stage_digests
from pipeline.core.runtime import start_stage


def main() -> int:
    args, params = start_stage("externals", __doc__, paths=("out",))
    write_stage_digests(params, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
