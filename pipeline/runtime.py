"""Process-level set-up shared by the stage entry points."""

from __future__ import annotations

import argparse
import logging


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def stage_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments every stage takes: where params live."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    return parser
