"""PDG image editing: Prompt-to-Prompt against SDEdit (img2img) on the same garment-colour edits.

For a seeded set of training source pairs (`--sources`, drawn by the generate stage's own
`plan_generation` with `num_samples` 1), keeps the caption edits whose single change recolours
the UPPER or the LOWER garment, and whose old colour is that garment's ground-truth colour in the
SynthPedes attributes (others are skipped and counted). Both methods then edit the same sources
with the `pdg` params of params.yaml, and we measure:

- throughput: samples/s over the wall time of the edit calls (batches of `pdg.batch_size`,
  after one untimed warm-up edit per method);
- locality: mean |generated - source| (0-255, averaged over RGB) inside the edited garment's
  region and outside it, and their ratio outside/inside (lower is more local). The region is
  approximate: pixels of the 128x64 source whose nearest palette colour (Euclidean RGB) is the
  old garment colour (and at most 60 away from it), within the garment's vertical band (upper:
  rows 20%-60% of the height, lower: 45%-90%), 4-connected to the central columns (40%-60% of
  the width) so that background patches of the same colour drop out. The VAE round trip
  (fit to the model's resolution, encode, decode, cut back to 128x64) gives the floor of the
  change that any edit pays before the diffusion model does anything; the resize round trip
  (fit and cut back only) shows how much of that floor is resampling rather than the VAE;
- edit success by the attribute probe: the edited garment reads as the new colour AND the other
  garment still reads as the source's colour (the other garment counts only where it is visible:
  an upper edit of a person in a dress, or with occluded legs, is judged on the upper alone);
  both parts are also reported separately, and the probe's reading of the unedited sources as a
  sanity check;
- optionally (--ablation) Prompt-to-Prompt with attention control off (joint denoising and
  local blending kept; no attention injection or reweighting).

Run from the repository root, e.g.

    python benchmarks/bench_pdg.py --generator models/generator --probe models/probe --sources 40

`--sheet PATH` also saves a PNG with one row per edit: the source, then each method's output.
If the probe folder holds no saved probe, one is trained on the prepared train split (as the
train_generator stage does) and saved there. Writes benchmarks/results/pdg.json (or --out) and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.core.config import PdgConfig, load_params
from pipeline.data.canonical import manifest_path, read_manifest
from pipeline.data.synthpedes import COLOR_RGB
from pipeline.core.io import write_json_atomic
from pipeline.editing.edit import EditRequest, edit_p2p_batch
from pipeline.editing.settings import EditSettings
from pipeline.pdg.generate import GenerationJob, alignable_with, make_editor, plan_generation
from pipeline.pdg.shards import load_source_images
from pipeline.generator.checkpoint import resolve_generator
from pipeline.generator.data import load_images
from pipeline.generator.model import DiffusionParts, back_to_crop, fit_to_model, load_generator
from pipeline.generator.probe import CONFIG_FILE, AttributeProbe, probe_accuracy, train_probe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # experiments/ (research code, not installed)
from experiments.edit_check import ColourEdit, colour_edit, edit_confirmed, edit_readings, read_colours  # noqa: E402

# Vertical bands (fractions of the image height) where each garment sits in a SynthPedes render.
GARMENT_BANDS = {"upper": (0.20, 0.60), "lower": (0.45, 0.90)}
# Background patches can share a garment's palette colour: the region keeps only close matches
# (shading darkens a garment by up to about this much) connected to the central columns.
MAX_COLOUR_DISTANCE = 60.0
CENTRE_COLUMNS = (0.40, 0.60)
MIN_REGION_PIXELS = 30  # smaller garment regions (mostly hidden) are skipped: locality would be noise
PALETTE_NAMES = tuple(COLOR_RGB)
PALETTE_RGB = np.array([COLOR_RGB[name] for name in PALETTE_NAMES], dtype=np.float32)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default=str(REPO / "models" / "generator"),
                        help="StableDiffusionPipeline folder (or one pointing at a pretrained checkpoint)")
    parser.add_argument("--probe", default=str(REPO / "models" / "probe"),
                        help="attribute probe folder (a probe is trained and saved there if it holds none)")
    parser.add_argument("--prepared", default=str(REPO / "data" / "prepared"))
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--sources", type=int, default=40, help="training source pairs to plan edits for")
    parser.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                        help="also run Prompt-to-Prompt with attention control off")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on a small shared CPU, more threads spin against each other")
    parser.add_argument("--sheet", default="", help="also save a PNG: per edit, the source and each method's output")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pdg.json"))
    return parser.parse_args()


# ---------------------------------------------------------------- choosing the edits


@dataclass(frozen=True)
class GarmentEdit(ColourEdit):
    """A planned edit that recolours one garment, with the source's ground truth."""

    job: GenerationJob = field(kw_only=True)


def select_garment_edits(jobs: list[GenerationJob]) -> tuple[list[GarmentEdit], Counter]:
    """The jobs whose single change recolours the upper or lower garment; skip reasons counted."""
    kept, skipped = [], Counter()
    for job in jobs:
        attributes = json.loads(job.source.attributes) if job.source.attributes else {}
        edit, why_not = colour_edit([change.to_json() for change in job.edit.changes], attributes)
        if edit is None:
            skipped[why_not] += 1
        else:
            kept.append(GarmentEdit(**dataclasses.asdict(edit), job=job))
    return kept, skipped


# ---------------------------------------------------------------- regions and pixel change


def garment_region(source: np.ndarray, garment: str, old_color: str) -> np.ndarray:
    """Boolean (height, width) mask of the garment's pixels in the source, approximately: pixels
    whose nearest palette colour is the old colour (and within MAX_COLOUR_DISTANCE of it), inside
    the garment's vertical band, connected to the image's central columns (where the person stands)."""
    distances = np.linalg.norm(source[:, :, None, :].astype(np.float32) - PALETTE_RGB, axis=-1)
    old = PALETTE_NAMES.index(old_color)
    coloured = (distances.argmin(-1) == old) & (distances[:, :, old] < MAX_COLOUR_DISTANCE)
    height, width = coloured.shape
    top, bottom = GARMENT_BANDS[garment]
    in_band = np.zeros_like(coloured)
    in_band[round(top * height) : round(bottom * height)] = True
    centre = np.zeros_like(coloured)
    centre[:, round(CENTRE_COLUMNS[0] * width) : round(CENTRE_COLUMNS[1] * width)] = True
    candidates = coloured & in_band
    return grow_within(candidates & centre, candidates)


def grow_within(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The pixels of `allowed` 4-connected to `seed` (flood fill by repeated dilation)."""
    region = seed & allowed
    while True:
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= allowed
        if (grown == region).all():
            return region
        region = grown


def pixel_change(generated: Image.Image, source: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    """Mean |generated - source| (0-255, averaged over RGB) inside and outside the region."""
    change = np.abs(np.asarray(generated.convert("RGB"), dtype=np.float32) - source).mean(-1)
    return float(change[region].mean()), float(change[~region].mean())


def locality(images: list[Image.Image], sources: list[np.ndarray], regions: list[np.ndarray]) -> dict:
    pairs = [pixel_change(image, source, region) for image, source, region in zip(images, sources, regions)]
    inside = float(np.mean([p[0] for p in pairs]))
    outside = float(np.mean([p[1] for p in pairs]))
    return {"inside": inside, "outside": outside, "outside_over_inside": outside / inside if inside else float("nan")}


# ---------------------------------------------------------------- the attribute probe


def ensure_probe(directory: Path, prepared: str, height: int, width: int, seed: int) -> tuple[AttributeProbe, dict]:
    """Loads the probe, or trains one on the train split (as the train_generator stage does) and saves it."""
    if (directory / CONFIG_FILE).is_file():
        return AttributeProbe.load(directory), {"trained_here": False}
    started = time.perf_counter()
    probe, _ = train_probe(load_images(prepared, "train", height, width), seed=seed, show_progress=False)
    probe.save(directory)
    accuracy = probe_accuracy(probe, load_images(prepared, "val", height, width))
    return probe, {"trained_here": True, "seconds": time.perf_counter() - started, "val_accuracy": accuracy}


def percent(hits: list[bool]) -> float:
    return 100.0 * sum(hits) / len(hits) if hits else float("nan")


def edit_success(edits: list[GarmentEdit], readings: list[dict[str, str]]) -> dict:
    """Shares (%) of edits showing the new colour, keeping the other (visible) garment, and both."""
    judged = [edit_readings(e, reading) for e, reading in zip(edits, readings)]
    shown = [s for s, _ in judged]
    kept = [k for _, k in judged]
    both = [edit_confirmed(e, reading) for e, reading in zip(edits, readings)]
    by_garment = {
        garment: percent([b for b, e in zip(both, edits) if e.garment == garment]) for garment in ("upper", "lower")
    }
    return {
        "success": percent(both),
        "new_colour_shown": percent(shown),
        "other_garment_kept": percent([k for k in kept if k is not None]),
        "other_garment_judged": sum(k is not None for k in kept),
        "success_by_edited_garment": by_garment,
    }


def source_reading(edits: list[GarmentEdit], readings: list[dict[str, str]]) -> dict:
    """Sanity: how often the probe reads the unedited sources' own colours (%)."""
    upper = [r["upper"] == e.attributes["upper_color"] for e, r in zip(edits, readings)]
    lower = [r["lower"] == e.attributes["lower_color"] if e.visible("lower") else None for e, r in zip(edits, readings)]
    both = [u and l is not False for u, l in zip(upper, lower)]
    judged_lower = [hit for hit in lower if hit is not None]
    return {"both_correct": percent(both), "upper_correct": percent(upper), "lower_correct": percent(judged_lower)}


# ---------------------------------------------------------------- the editing methods


def p2p_without_attention_control(parts: DiffusionParts, cfg: PdgConfig):
    """Prompt-to-Prompt as `make_editor` binds it, with attention injection and reweighting off
    (no steps of cross- or self-attention replaced, reweight 1): joint denoising and blending stay."""

    settings = dataclasses.replace(
        EditSettings.from_config(cfg), cross_replace_fraction=0.0, self_replace_fraction=0.0, reweight=1.0
    )

    def edit(jobs: list[GenerationJob], sources: list[Image.Image]) -> list:
        requests = [
            EditRequest(image, job.edit.source, job.edit.edited,
                        [(change.source_span, change.edited_span) for change in job.edit.changes])
            for job, image in zip(jobs, sources)
        ]
        return edit_p2p_batch(parts, requests, settings)

    return edit


def run_editor(
    editor, edits: list[GarmentEdit], sources: list[Image.Image], batch_size: int
) -> tuple[list[Image.Image], float]:
    """Edited images and the wall time of the edit calls (one untimed warm-up edit first)."""
    editor([edits[0].job], sources[:1])
    images, seconds = [], 0.0
    for start in range(0, len(edits), batch_size):
        jobs = [e.job for e in edits[start : start + batch_size]]
        started = time.perf_counter()
        results = editor(jobs, sources[start : start + batch_size])
        seconds += time.perf_counter() - started
        images += [result.image for result in results]
    return images, seconds


def vae_round_trip(parts: DiffusionParts, sources: list[Image.Image]) -> list[Image.Image]:
    """Each source fitted to the model, encoded and decoded by the VAE, and cut back to its size."""
    fitted = [fit_to_model(image, parts.image_size) for image in sources]
    decoded = parts.latents_to_images(parts.images_to_latents([image for image, _ in fitted]))
    return [back_to_crop(image, box, source.size) for image, (_, box), source in zip(decoded, fitted, sources)]


def resize_round_trip(parts: DiffusionParts, sources: list[Image.Image]) -> list[Image.Image]:
    """Each source only fitted to the model's resolution and cut back: the resampling part of the floor."""
    fitted = [fit_to_model(image, parts.image_size) for image in sources]
    return [back_to_crop(image, box, source.size) for (image, box), source in zip(fitted, sources)]


def save_contact_sheet(path: str, columns: dict[str, list[Image.Image]]) -> None:
    """One row per edit: the source, then each method's output, left to right in `columns` order."""
    rows = [np.concatenate([np.asarray(images[i].convert("RGB")) for images in columns.values()], 1)
            for i in range(len(next(iter(columns.values()))))]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, 0)).save(path)


# ---------------------------------------------------------------- report


def markdown_table(rows: dict[str, dict]) -> str:
    header = ("| method | samples | samples/s | change inside | change outside | outside/inside "
              "| success % | new colour % | other kept % |")
    lines = [header, "|" + "---|" * 9]
    for name, row in rows.items():
        loc, probe = row["locality"], row.get("probe", {})
        rate = f"{row['samples_per_s']:.2f}" if "samples_per_s" in row else "-"
        lines.append(
            f"| {name} | {row['samples']} | {rate} | {loc['inside']:.1f} | {loc['outside']:.1f} "
            f"| {loc['outside_over_inside']:.3f} | {_fmt(probe.get('success'))} "
            f"| {_fmt(probe.get('new_colour_shown'))} | {_fmt(probe.get('other_garment_kept'))} |"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> None:
    args = arguments()
    started_at = datetime.now(timezone.utc)
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    pdg = dataclasses.replace(params.pdg, source_count=args.sources, num_samples=1)
    generator = resolve_generator(args.generator)
    canvas = (pdg.canvas_width, pdg.canvas_height) if pdg.canvas_width else None
    parts = load_generator(generator, "cpu", pdg.precision, canvas=canvas)
    probe, probe_info = ensure_probe(Path(args.probe), args.prepared, params.generator.height,
                                     params.generator.width, params.generator.seed)

    rows = read_manifest(manifest_path(args.prepared, "train"))
    plan = plan_generation(rows, pdg, alignable_with(parts.tokenizer))
    edits, skipped = select_garment_edits(plan.jobs)
    images = load_source_images(args.prepared, {e.job.source.key for e in edits})
    sources = [Image.open(io.BytesIO(images[e.job.source.key])).convert("RGB") for e in edits]
    source_arrays = [np.asarray(image, dtype=np.float32) for image in sources]
    regions = [garment_region(a, e.garment, e.old_color) for a, e in zip(source_arrays, edits)]
    large_enough = [i for i, region in enumerate(regions) if region.sum() >= MIN_REGION_PIXELS]
    skipped["garment_region_too_small"] += len(edits) - len(large_enough)
    edits, sources, source_arrays, regions = (
        [items[i] for i in large_enough] for items in (edits, sources, source_arrays, regions)
    )
    print(f"{len(plan.jobs)} planned edits from {plan.sources} sources; {len(edits)} garment-colour edits kept; "
          f"skipped {dict(skipped)}", flush=True)

    editors = {
        "p2p": make_editor(parts, dataclasses.replace(pdg, method="p2p")),
        "img2img": make_editor(parts, dataclasses.replace(pdg, method="img2img")),
    }
    if args.ablation:
        editors["p2p, attention control off"] = p2p_without_attention_control(parts, pdg)

    results, outputs = {}, {}
    for name, editor in editors.items():
        generated, seconds = run_editor(editor, edits, sources, pdg.batch_size)
        outputs[name] = generated
        results[name] = {
            "samples": len(generated),
            "seconds": seconds,
            "samples_per_s": len(generated) / seconds,
            "locality": locality(generated, source_arrays, regions),
            "probe": edit_success(edits, read_colours(probe, generated)),
        }
        print(f"{name}: {results[name]}", flush=True)
    floors = {"VAE round trip (floor)": vae_round_trip(parts, sources),
              "resize round trip only": resize_round_trip(parts, sources)}
    for name, images in floors.items():
        results[name] = {
            "samples": len(images),
            "locality": locality(images, source_arrays, regions),
            "probe": edit_success(edits, read_colours(probe, images)),  # success ~0 and "kept" ~100 expected
        }
    if args.sheet:
        save_contact_sheet(args.sheet, {"source": sources, **outputs})

    table = markdown_table(results)
    report = {
        "date": started_at.isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "runtime_s": (datetime.now(timezone.utc) - started_at).total_seconds(),
        "threads": torch.get_num_threads(),
        "generator": generator,
        "probe": {"path": args.probe, **probe_info},
        "pdg_params": dataclasses.asdict(pdg),
        "sources": args.sources,
        "plan": {"sources": plan.sources, "sources_without_edit": plan.sources_without_edit,
                 "edits_not_alignable": plan.edits_not_alignable, "planned_edits": len(plan.jobs)},
        "edits": len(edits),
        "edited_garments": dict(Counter(e.garment for e in edits)),
        "skipped": dict(skipped),
        "region": {"bands": GARMENT_BANDS, "min_pixels": MIN_REGION_PIXELS,
                   "mean_pixels": float(np.mean([r.sum() for r in regions])),
                   "max_colour_distance": MAX_COLOUR_DISTANCE, "centre_columns": CENTRE_COLUMNS,
                   "rule": "source pixels whose nearest palette colour is the old garment colour (within "
                           "max_colour_distance), in the band, 4-connected to the centre columns"},
        "source_probe_reading": source_reading(edits, read_colours(probe, sources)),
        "methods": results,
        "contact_sheet": args.sheet or None,
        "table": table,
    }
    write_json_atomic(args.out, report)
    print(f"\nsources read correctly by the probe: {report['source_probe_reading']}")
    print(table)


if __name__ == "__main__":
    main()
