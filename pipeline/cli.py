"""`python -m pipeline <command>`: user-facing tools outside the DVC stages."""

from __future__ import annotations

import argparse

from pipeline.data.validate import FORMATS, check_data_command
from pipeline.core.profile import PROFILES, profile_command
from pipeline.search.command import add_commands as add_search_commands
from pipeline.text.edit_command import edit_captions_command


def _gpu_count(text: str) -> int:
    """--gpus: a whole number of at least 1 (argparse turns the ValueError into one usage line, exit 2)."""
    count = int(text)
    if count < 1:
        raise ValueError(text)
    return count


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check-data", help="validate a data set folder and print its statistics")
    check.add_argument("--format", required=True, choices=FORMATS)
    check.add_argument("--root", required=True, help="the data set folder")
    check.add_argument("--annotations", help="annotation file (default: the format's usual name inside --root)")
    check.set_defaults(run=lambda a: check_data_command(a.format, a.root, a.annotations))

    edit = commands.add_parser("edit-captions", help="change one garment colour per edit; write JSON lines")
    edit.add_argument("--input", required=True, help="captions: a .txt file (one per line) or a .json annotation file")
    edit.add_argument("--num", type=int, default=1, help="distinct edits per caption, at most (default 1)")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--output", help="JSON lines file (default: stdout)")
    edit.add_argument("--allow-hair", action="store_true", help="also edit hair colours")
    edit.set_defaults(run=lambda a: edit_captions_command(a.input, a.num, a.seed, a.output, a.allow_hair))

    profile = commands.add_parser("profile", help="write a profile's keys into params.yaml (real recipe or embedded)")
    profile.add_argument("name", choices=PROFILES)
    profile.add_argument("--data-root", help="the benchmark's folder (annotation file and imgs/)")
    profile.add_argument("--clip", help="a CLIP ViT-B/16 folder (CLIPModel): the dual encoder and the filter's scorer")
    profile.add_argument("--sd", help="a Stable Diffusion 1.5 folder (diffusers layout): the PDG generator")
    profile.add_argument("--captioner", help="an image-to-text model folder (e.g. BLIP base), optional")
    profile.add_argument("--params", default="params.yaml", help="the params file to write (default: params.yaml)")
    profile.add_argument("--no-check", action="store_true", help="write even if a folder is missing or unreadable")
    profile.add_argument("--gpus", type=_gpu_count, default=1,
                         help="GPUs of a node that train and generate use (above 1: accelerate launch --multi_gpu)")
    profile.set_defaults(run=lambda a: profile_command(a.name, a.params, a.data_root, a.clip, a.sd, a.captioner,
                                                       check=not a.no_check, gpus=a.gpus))

    add_search_commands(commands)  # search, serve
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)
