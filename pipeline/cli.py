"""`python -m pipeline <command>`: user-facing tools outside the DVC stages."""

from __future__ import annotations

import argparse

from pipeline.data.validate import FORMATS, check_data_command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check-data", help="validate a data set folder and print its statistics")
    check.add_argument("--format", required=True, choices=FORMATS)
    check.add_argument("--root", required=True, help="the data set folder")
    check.add_argument("--annotations", help="annotation file (default: the format's usual name inside --root)")
    check.set_defaults(run=lambda a: check_data_command(a.format, a.root, a.annotations))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)
