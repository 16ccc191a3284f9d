"""The embedded generator at full size: phase times, VAE PSNR, probe accuracy, prompted-colour accuracy.

Trains the generator and the probe once with the `generator` section of params.yaml (plus any
`--set key=value` overrides), then measures the prompted-colour accuracy at several guidance
scales. Run from the repository root after `dvc repro prepare`:

    python benchmarks/bench_generator.py --guidance 2 4 6

UNet experiments can reuse a trained autoencoder and probe (here the committed ones), so that
only the UNet trains and every row reads its samples with the same probe:

    python benchmarks/bench_generator.py --autoencoder models/generator --probe models/probe \
        --set minilm_layers=3 --guidance 4 7 --out benchmarks/results/generator_minilm3.json

Writes benchmarks/results/generator.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL

from pipeline.core.config import load_params, params_from_dict
from pipeline.core.io import write_json_atomic
from pipeline.generator.checkpoint import save_pipeline
from pipeline.generator.data import load_images
from pipeline.generator.samples import plot_loss_curves, write_sample_grid
from pipeline.generator.training import reconstruction_psnr, train_generator
from pipeline.generator.probe import (
    WEIGHTS_FILE,
    AttributeProbe,
    colour_prompts,
    probe_accuracy,
    prompted_color_accuracy,
    train_probe,
)

REPO = Path(__file__).resolve().parents[1]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="generator.KEY overrides (YAML values)")
    parser.add_argument("--guidance", nargs="+", type=float, default=[2.0, 4.0, 6.0])
    parser.add_argument("--prompts", type=int, default=200, help="val captions naming a garment colour")
    parser.add_argument("--prepared", default=str(REPO / "data" / "prepared"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "generator.json"))
    parser.add_argument("--save", default="", help="also save the pipeline, probe, loss curves and samples here")
    parser.add_argument("--autoencoder", default="", help="a saved generator folder whose autoencoder is reused (not trained)")
    parser.add_argument("--probe", default="", help="a saved probe folder (models/probe) instead of training one")
    return parser.parse_args()


def generator_config(args: argparse.Namespace):
    params = load_params(args.params)
    overrides = dict(item.split("=", 1) for item in args.set)
    section = {**dataclasses.asdict(params.generator), **{k: yaml.safe_load(v) for k, v in overrides.items()}}
    return params_from_dict({"generator": section}).generator


def reused_autoencoder(folder: str, cfg) -> AutoencoderKL | None:
    """The autoencoder of a saved generator, checked against the generator params it must fit."""
    if not folder:
        return None
    if not (Path(folder) / "vae" / "config.json").is_file():
        sys.exit(f"--autoencoder {folder}: no saved generator there (expected {folder}/vae/config.json)")
    vae = AutoencoderKL.from_pretrained(Path(folder) / "vae").eval()
    if vae.config.latent_channels != cfg.latent_channels or list(vae.config.block_out_channels) != list(cfg.vae_channels):
        sys.exit(f"{folder}/vae has {vae.config.latent_channels} latent channels and levels "
                 f"{vae.config.block_out_channels}; the params say {cfg.latent_channels} and {cfg.vae_channels}")
    return vae


def saved_probe(folder: str) -> AttributeProbe:
    if not (Path(folder) / WEIGHTS_FILE).is_file():
        sys.exit(f"--probe {folder}: no saved probe there (expected {folder}/{WEIGHTS_FILE})")
    return AttributeProbe.load(folder)


def main() -> None:
    args = arguments()
    cfg = generator_config(args)
    reused_vae = reused_autoencoder(args.autoencoder, cfg)  # a bad folder stops before any work
    started = time.perf_counter()
    train = load_images(args.prepared, "train", cfg.height, cfg.width)
    val = load_images(args.prepared, "val", cfg.height, cfg.width)
    seconds = {"load": time.perf_counter() - started}

    started = time.perf_counter()
    probe = saved_probe(args.probe) if args.probe else train_probe(train, seed=cfg.seed)[0]
    seconds["probe"] = time.perf_counter() - started

    trained = train_generator(cfg, train, vae=reused_vae)
    seconds.update(trained.seconds)
    psnr = {"train": reconstruction_psnr(trained.sd.vae, train.pixels[:400]),
            "val": reconstruction_psnr(trained.sd.vae, val.pixels)}

    if args.save:
        save_pipeline(trained.sd, Path(args.save) / "pipeline")
        probe.save(Path(args.save) / "probe")
        plot_loss_curves(trained, Path(args.save) / "loss_curves.png")
        write_sample_grid(trained.sd, val, Path(args.save) / "samples.png", guidance=cfg.guidance,
                          steps=cfg.sample_steps, seed=cfg.seed)

    prompts = colour_prompts(val, limit=args.prompts)
    by_guidance = {}
    for guidance in args.guidance:
        started = time.perf_counter()
        result = prompted_color_accuracy(trained.sd, probe, prompts, guidance=guidance,
                                         steps=cfg.sample_steps, seed=cfg.seed)
        by_guidance[str(guidance)] = {**result, "seconds": time.perf_counter() - started}
        print(f"guidance {guidance}: {result}", flush=True)

    report = {
        "date": date.today().isoformat(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "threads": torch.get_num_threads(),
        "generator": dataclasses.asdict(cfg),
        "seconds": seconds,
        "train_seconds": trained.seconds["vae"] + trained.seconds["unet"],
        "reused": {"autoencoder": args.autoencoder, "probe": args.probe},
        "final_loss": {"vae": _tail_mean(trained.vae_losses), "unet": _tail_mean(trained.unet_losses)},
        "vae_psnr_db": psnr,
        "probe_val_accuracy": probe_accuracy(probe, val),
        "prompted_color_accuracy": by_guidance,
    }
    write_json_atomic(args.out, report)
    print(yaml.safe_dump(report, sort_keys=False))


def _tail_mean(losses: list[tuple[int, float]], window: int = 50) -> float | None:
    tail = [loss for _, loss in losses[-window:]]
    return sum(tail) / len(tail) if tail else None


if __name__ == "__main__":
    main()
