"""DVC stage `train_generator`: the text-to-image model of proximity data generation, and its probe.

Embedded profile (generator.pretrained == "")
- The stage trains the small latent diffusion model. Its data is the prepared training split, plus
  the synth.num_generator_ids SynthPedes identities rendered for it alone. Those are its
  "pretraining" data, as Stable Diffusion's are in the paper. It saves the model as a
  StableDiffusionPipeline folder in models/generator.
- It trains the attribute probe (models/probe) when the data carries colour labels, on the training
  split only. With the probe it measures how often generated images show the prompted garment colours.

Real profile (generator.pretrained set)
- The stage trains nothing. models/generator holds only pretrained.json, which names the checkpoint.
  `pipeline.generator.checkpoint.resolve_generator` hands it to the next stage, so changing the
  checkpoint reruns what depends on it.
- models/probe holds only a note.

The reports are the same files in both profiles. samples.png is a sample grid from the pretrained
model, drawn from a few val captions. Its images are person-shaped where the model is Stable
Diffusion 1.x-sized. loss_curves.png is a figure saying that nothing was trained.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from pipeline.core.config import GeneratorConfig, SynthConfig
from pipeline.data.synthpedes import render_generator_pool
from pipeline.core.hub import looks_like_path
from pipeline.core.io import replace_directory, start_directory, write_json_atomic
from pipeline.generator.checkpoint import load_pretrained_pipeline, pretrained_sample_size, save_pipeline, write_pretrained_pointer
from pipeline.generator.data import labelled_images, LabelledImages, load_grid_images, load_images
from pipeline.generator.samples import plot_loss_curves, plot_no_training, write_sample_grid
from pipeline.generator.training import reconstruction_psnr, train_generator
from pipeline.generator.probe import AttributeProbe, colour_prompts, probe_accuracy, prompted_color_accuracy, train_probe
from pipeline.core.devices import inference_device
from pipeline.core.runtime import split_timing, start_stage

EVALUATION_PROMPTS = 200  # val captions naming a garment colour, for the prompted-colour accuracy
# The sample grid of a pretrained checkpoint: few images, since a real Stable Diffusion on a CPU is slow.
PRETRAINED_GRID_PROMPTS = 4
PRETRAINED_GRID_SAMPLES = 2

log = logging.getLogger("stages.train_generator")


def main() -> int:
    paths, params = start_stage("train_generator", __doc__, paths=("prepared", "generator", "probe", "metrics", "reports"))
    cfg = params.generator
    started = time.perf_counter()
    shutil.rmtree(paths.reports, ignore_errors=True)
    paths.reports.mkdir(parents=True)
    # the model folders are written whole under staging names, then swapped in (pipeline/core/io.py)
    staged = argparse.Namespace(**{**vars(paths), "generator": start_directory(paths.generator),
                                   "probe": start_directory(paths.probe)})
    try:
        metrics = point_at_pretrained(cfg, staged) if cfg.pretrained else train_embedded(cfg, params.synth, staged)
    except PretrainedNotLoadable as err:
        log.error("%s", err)
        return 1
    for name in ("generator", "probe"):
        replace_directory(getattr(staged, name), getattr(paths, name))
    metrics["stage_seconds"] = time.perf_counter() - started
    metrics, timing = split_timing(metrics)
    write_json_atomic(paths.metrics, metrics)
    write_json_atomic(paths.reports / "timing.json", timing)
    log.info("metrics: %s; timing: %s", metrics, timing)
    return 0


def point_at_pretrained(cfg: GeneratorConfig, paths) -> dict:
    """Points the generator folder at the checkpoint; the reports are a sample grid from it and a figure
    saying that nothing was trained (the stage's outputs are the same in both profiles)."""
    sd = load_pretrained(cfg.pretrained)
    write_pretrained_pointer(paths.generator, cfg.pretrained)
    write_json_atomic(paths.probe / "absent.json", {"reason": "generator.pretrained is set: nothing is trained"})
    plot_no_training(cfg.pretrained, paths.reports / "loss_curves.png")
    height, width = pretrained_sample_size(sd)
    started = time.perf_counter()
    val = load_grid_images(paths.prepared, "val", height, width, PRETRAINED_GRID_PROMPTS)
    write_sample_grid(sd, val, paths.reports / "samples.png", guidance=cfg.guidance, steps=cfg.sample_steps,
                      seed=cfg.seed, prompts=PRETRAINED_GRID_PROMPTS, samples=PRETRAINED_GRID_SAMPLES,
                      height=height, width=width)
    seconds = time.perf_counter() - started
    log.info("generator: the pretrained checkpoint %s (nothing trained); sample grid at %dx%d in %.1f s",
             cfg.pretrained, height, width, seconds)
    return {"pretrained": cfg.pretrained, "guidance": cfg.guidance,
            "sample_grid": {"prompts": len(val), "samples": PRETRAINED_GRID_SAMPLES, "height": height, "width": width,
                            "steps": cfg.sample_steps},
            "seconds": {"sample_grid": seconds}}


class PretrainedNotLoadable(Exception):
    """generator.pretrained names nothing loadable; the message says what (the stage logs it)."""


def load_pretrained(pretrained: str):
    folder = Path(pretrained).expanduser()
    if not folder.is_dir() and looks_like_path(pretrained):
        raise PretrainedNotLoadable(f"params: 'generator.pretrained' {pretrained!r}: no such folder {folder}")
    name = str(folder) if folder.is_dir() else pretrained
    try:
        return load_pretrained_pipeline(name, inference_device())
    except (OSError, ValueError, TypeError) as err:
        raise PretrainedNotLoadable(f"params: 'generator.pretrained' {pretrained!r} could not be loaded as a "
                                    f"Stable Diffusion pipeline: {err}") from None


def train_embedded(cfg: GeneratorConfig, synth: SynthConfig, paths) -> dict:
    train = load_images(paths.prepared, "train", cfg.height, cfg.width)
    val = load_images(paths.prepared, "val", cfg.height, cfg.width)
    probe, probe_metrics = fit_probe(train, val, cfg, paths.probe)  # the measuring instrument: annotated images only
    pool = generator_pool(synth, cfg)
    generator_metrics = fit_generator(train + pool, val, cfg, probe, paths)
    return {"pretrained": "", "probe": probe_metrics,
            "generator": {"train_images": len(train), "pool_images": len(pool), **generator_metrics}}


def generator_pool(synth: SynthConfig, cfg: GeneratorConfig) -> LabelledImages:
    """The images of synth.num_generator_ids identities no encoder sees (none when it is 0)."""
    if not synth.num_generator_ids:
        return labelled_images([], cfg.height, cfg.width)
    log.info("rendering %d identities for the generator only", synth.num_generator_ids)
    pool = labelled_images(render_generator_pool(synth), cfg.height, cfg.width)
    log.info("generator pool: %d images", len(pool))
    return pool


def fit_probe(train: LabelledImages, val: LabelledImages, cfg: GeneratorConfig, folder: Path) -> tuple[AttributeProbe | None, dict]:
    """Trains and saves the probe; None (and a note in its folder) when the data has no colour labels."""
    if not all(row.get("upper_color") for row in train.attributes):
        write_json_atomic(folder / "absent.json", {"reason": "the training data carries no colour labels"})
        return None, {}
    started = time.perf_counter()
    probe, _ = train_probe(train, seed=cfg.seed)
    probe.save(folder)
    metrics = {"val_accuracy": probe_accuracy(probe, val), "seconds": time.perf_counter() - started}
    log.info("probe: %s", metrics)
    return probe, metrics


def fit_generator(
    train: LabelledImages, val: LabelledImages, cfg: GeneratorConfig, probe: AttributeProbe | None, paths
) -> dict:
    trained = train_generator(cfg, train)
    save_pipeline(trained.sd, paths.generator)
    plot_loss_curves(trained, paths.reports / "loss_curves.png")
    psnr = reconstruction_psnr(trained.sd.vae, val.pixels)
    log.info("generator: val PSNR %.2f dB, seconds %s", psnr, trained.seconds)
    started = time.perf_counter()
    write_sample_grid(trained.sd, val, paths.reports / "samples.png", guidance=cfg.guidance,
                      steps=cfg.sample_steps, seed=cfg.seed)
    metrics = {"vae_val_psnr_db": psnr, "guidance": cfg.guidance}
    if probe is not None:
        prompts = colour_prompts(val, limit=EVALUATION_PROMPTS)
        metrics["prompted_color_accuracy"] = prompted_color_accuracy(
            trained.sd, probe, prompts, guidance=cfg.guidance, steps=cfg.sample_steps, seed=cfg.seed
        )
    metrics["seconds"] = {**trained.seconds, "evaluation": time.perf_counter() - started}
    return metrics


if __name__ == "__main__":
    sys.exit(main())
