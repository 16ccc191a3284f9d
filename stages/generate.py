"""DVC stage `generate`: edit training pairs into proximity pairs, written as data/pdg/raw shards.

The stage runs under a launcher too. `pdg.launcher` picks torchrun or accelerate launch, in dvc.yaml's
command. Each process writes its own shards. The main process alone digests the inputs and decides
whether the folder's shards are this configuration's. It then waits for every shard file. There is no
collective at the end, because ranks may finish hours apart.

The stage logs the UNet evaluations at three points.
- Before the run, it logs the planned count (`pipeline.pdg.cost`).
- After the first batch, it logs the estimate at the measured rate.
- At the end, it logs the measured count and rate (metrics/generate.json).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm

from pipeline.core.devices import has_gpu
from pipeline.core.distributed import accelerator_for, check_shared_folder, on_main
from pipeline.core.io import write_json_atomic
from pipeline.core.runtime import start_stage
from pipeline.data.canonical import iter_shard_samples, list_shards, manifest_path, read_manifest
from pipeline.pdg.cost import MeteredEditor, count_unet, plan_unet_evaluations
from pipeline.pdg.generate import (
    alignable_with,
    generation_fingerprint,
    make_editor,
    plan_generation,
    run_generation,
    shard_names,
    wait_for_shards,
)
from pipeline.pdg.oracle import oracle_editor, oracle_plan
from pipeline.pdg.shards import load_source_images, pdg_shards
from pipeline.generator.checkpoint import resolve_generator
from pipeline.generator.model import load_generator
from pipeline.plots import plot_generated_pairs
from pipeline.run_folder import reuse_or_start

log = logging.getLogger("stages.generate")


def _sample_sheet(plan, sources: dict[str, bytes], count: int, out_dir: Path, sheet: Path) -> None:
    wanted = {job.key: job for job in plan.jobs[:count]}
    shards = pdg_shards(out_dir)
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
        plot_generated_pairs(rows, sheet, "proximity pairs: source, generated, blend mask")


def _estimate(planned: int, rows_per_s: float, processes: int) -> tuple[float | None, str]:
    hours = planned / (rows_per_s * processes) / 3600 if rows_per_s else None
    rate = f"about {hours:.3g} hours at the measured rate" if hours is not None else "no rate measured"
    return hours, (f"{planned} UNet evaluations, {rate} ({rows_per_s:.1f} rows/s x {processes} process(es)); "
                   f"limit it with pdg.source_count / pdg.num_samples / pdg.num_steps")


def main() -> int:
    args, params = start_stage("generate", __doc__, paths=("prepared", "generator", "out", "metrics", "timing", "sheet"), launcher=True)
    cfg = params.pdg
    accelerator = accelerator_for(cpu=not has_gpu())
    check_shared_folder(accelerator, args.out.parent)
    generator_dir = resolve_generator(args.generator)
    canvas = (cfg.canvas_width, cfg.canvas_height) if cfg.canvas_width else None
    parts = load_generator(generator_dir, accelerator.device, cfg.precision, canvas=canvas)
    # the oracle plans the diffusion generator's jobs (the same alignable edits), less those it cannot render
    plan = plan_generation(read_manifest(manifest_path(args.prepared, "train")), cfg, alignable_with(parts.tokenizer))
    if cfg.method == "oracle":
        try:
            plan = oracle_plan(plan, params.synth.seed)
        except ValueError as err:
            log.error("params: 'pdg.method' oracle: %s", err)
            return 1
    log.info("%d samples planned from %d sources (%d without an editable caption, %d edits not alignable, "
             "%d not renderable); generator at %dx%d pixels in %s", len(plan.jobs), plan.sources,
             plan.sources_without_edit, plan.edits_not_alignable, plan.edits_not_renderable, *parts.image_size,
             parts.dtype)
    sources = [manifest_path(args.prepared, "train"), *list_shards(args.prepared, "train")]
    # the finished shards of the same fingerprint are reused, anything else is started afresh
    on_main(accelerator, lambda: reuse_or_start(args.out, generation_fingerprint(cfg, generator_dir, sources)))
    rank, world = accelerator.process_index, accelerator.num_processes
    shards, names = plan.shards(cfg.shard_size), shard_names(plan, cfg)
    remaining = [i for i, name in enumerate(names) if not (args.out / name).is_file()]
    planned = plan_unet_evaluations(plan, cfg, remaining)
    metrics = {  # what the plan makes; how this run executed it (processes, rates, reuse) goes to --timing
        "method": cfg.method,
        "sources": plan.sources,
        "sources_without_edit": plan.sources_without_edit,
        "edits_not_alignable": plan.edits_not_alignable,
        "edits_not_renderable": plan.edits_not_renderable,
        "samples": len(plan.jobs),
        "shards": len(shards),
        "unet_evaluations": plan_unet_evaluations(plan, cfg),  # the whole plan, all processes
        "precision": str(parts.dtype).removeprefix("torch."),
        "canvas": list(parts.image_size),
    }
    timing = {"processes": world, "unet_evaluations_planned": planned}  # this run: its unfinished shards
    if accelerator.is_main_process:
        log.info("planned: %d UNet evaluations for %d unfinished shard(s) (%d for the whole plan)",
                 planned, len(remaining), metrics["unet_evaluations"])
        write_json_atomic(args.metrics, metrics)  # the plan, before any work
        write_json_atomic(args.timing, timing)  # the measured figures follow at the end
    images = load_source_images(args.prepared, {job.source.key for job in plan.jobs})
    mine = sum(len(jobs) for i, jobs in enumerate(shards) if i % world == rank)

    def first_batch(rows: int, seconds: float) -> None:
        if accelerator.is_main_process and seconds:
            log.info("after the first batch: %s", _estimate(planned, rows / seconds, world)[1])

    with count_unet(parts) as count, tqdm(total=mine, unit="sample", desc=f"generate ({cfg.method})",
                                          disable=not accelerator.is_main_process) as bar:
        edit = oracle_editor(params.synth.seed) if cfg.method == "oracle" else make_editor(parts, cfg)
        editor = MeteredEditor(edit, count, first_batch)
        report = run_generation(plan, images, editor, cfg, generator_dir, args.out, rank, world, bar.update)
    if accelerator.is_main_process:
        # no barrier here: under NCCL it times out after 30 minutes, and ranks may finish hours apart
        own_missing = [name for i, name in enumerate(names) if i % world == rank and not (args.out / name).is_file()]
        if own_missing:  # this process's own shards: waiting for them would never end
            raise RuntimeError(f"{len(own_missing)} shard(s) of this process were not written, e.g. {own_missing[0]}")
        wait_for_shards(args.out, names, poll_s=10.0)
        hours, estimate = _estimate(planned, editor.rows_per_s, world)
        log.info("measured: %d UNet evaluations (this process) at %.1f rows/s; planned %s",
                 count.rows, editor.rows_per_s, estimate)
        write_json_atomic(args.timing, {
            **timing,
            "samples_per_s": round(report.samples_per_s * world, 3),  # the main process's rate, times processes
            "shards_reused": report.shards_reused,
            "unet_evaluations_measured": count.rows,  # counted by the hook, this (the main) process
            "unet_evaluations_per_s": round(editor.rows_per_s, 3),  # this process, while editing
            "estimated_hours_at_measured_rate": None if hours is None else float(f"{hours:.3g}"),
        })
        _sample_sheet(plan, images, cfg.sheet_samples, args.out, args.sheet)
    log.info("wrote %d shard(s) (%d reused) at %.2f samples/s", report.shards_written, report.shards_reused, report.samples_per_s)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
