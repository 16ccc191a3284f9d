"""DVC stage `generate`: edit training pairs into proximity pairs, written as data/pdg/raw shards.

Runs under `accelerate launch` too: each process writes its own shards.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from pipeline.data.canonical import iter_shard_samples, manifest_path, read_manifest
from pipeline.io import write_json_atomic
from pipeline.pdg.generate import (
    alignable_with,
    generation_fingerprint,
    load_source_images,
    make_editor,
    pdg_shards,
    plan_generation,
    prepare_output,
    run_generation,
)
from pipeline.pdg.generator_training import resolve_generator
from pipeline.pdg.model import load_generator
from pipeline.plots import plot_generated_pairs
from pipeline.runtime import start_stage

PREPARED = Path("data/prepared")
GENERATOR_DIR = Path("models/generator")
OUT_DIR = Path("data/pdg/raw")
METRICS = Path("metrics/generate.json")
SHEET = Path("reports/pdg/sample_sheet.png")

log = logging.getLogger("stages.generate")


def _sample_sheet(plan, sources: dict[str, bytes], count: int) -> None:
    wanted = {job.key: job for job in plan.jobs[:count]}
    shards = pdg_shards(OUT_DIR)
    rows = []
    for sample in iter_shard_samples(shards):
        job = wanted.get(sample["__key__"])
        if job is None:
            continue
        change = "; ".join(f"{c.phrase_before} -> {c.phrase_after}" for c in job.edit.changes)
        rows.append({"source": sources[job.source.key], "generated": sample["png"], "mask": sample.get("mask.png"),
                     "source_caption": job.edit.source, "edited_caption": job.edit.edited, "change": change})
        if len(rows) == len(wanted):
            break
    if rows:
        plot_generated_pairs(rows, SHEET, "proximity pairs: source, generated, blend mask")


def main() -> int:
    _, params = start_stage(__doc__)
    cfg = params.pdg
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    generator = resolve_generator(GENERATOR_DIR)
    parts = load_generator(generator, accelerator.device)
    plan = plan_generation(read_manifest(manifest_path(PREPARED, "train")), cfg, alignable_with(parts.tokenizer))
    log.info("%d samples planned from %d sources (%d without an editable caption, %d edits not alignable)",
             len(plan.jobs), plan.sources, plan.sources_without_edit, plan.edits_not_alignable)
    prepare_output(OUT_DIR, generation_fingerprint(cfg, generator), accelerator.is_main_process)
    accelerator.wait_for_everyone()
    images = load_source_images(PREPARED, {job.source.key for job in plan.jobs})
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = sum(len(jobs) for i, jobs in enumerate(plan.shards(cfg.shard_size)) if i % world == rank)
    with tqdm(total=mine, unit="sample", desc=f"generate ({cfg.method})", disable=not accelerator.is_main_process) as bar:
        report = run_generation(plan, images, make_editor(parts, cfg), cfg, generator, OUT_DIR, rank, world, bar.update)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(METRICS, {
            "method": cfg.method,
            "sources": plan.sources,
            "sources_without_edit": plan.sources_without_edit,
            "edits_not_alignable": plan.edits_not_alignable,
            "samples": len(plan.jobs),
            "shards": len(plan.shards(cfg.shard_size)),
            "processes": world,
            "samples_per_s": round(report.samples_per_s * world, 3),  # the main process's rate, times processes
            "shards_kept_from_earlier_run": report.shards_kept,
        })
        _sample_sheet(plan, images, cfg.sheet_samples)
    log.info("wrote %d shard(s) (%d kept) at %.2f samples/s", report.shards_written, report.shards_kept, report.samples_per_s)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
