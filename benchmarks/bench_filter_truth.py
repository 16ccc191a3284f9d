"""The filter and the diffusion generator against SynthPedes' ground truth (pipeline/data/synthpedes/truth.py).

Filter. For every job of the generate stage's plan (the train sources and caption edits of
`params.yaml`'s pdg), the renderer draws the true edit and one image of each known-bad kind
(`KNOWN_BAD`: unchanged, wrong colour, wrong garment, blank, noise, different person). Each image
is scored with the job's source and edited captions exactly as the filter stage scores a generated
pair (scorer `filter.scorer`, thresholds calibrated on real training pairs), and judged by every
criterion but the near-duplicate one (which compares a source's kept pairs with each other). Per
kind: the ROC AUC of true edits against that kind under the filter's ranking (the calibrated
consistency score, below every pair failing a pixel check), and the share kept. The operating point
(`filter.margin_level`) is chosen on the val split: the largest level of a grid that keeps at least
`--keep` of the val sources' true edits; the train figures are then read at that level.

Generator. For the generate stage's pairs (data/pdg/raw), against the true edit of the same job:
the mean |generated - true| (0-255) inside the edited item's region and outside it, and whether the
colour is right by the renderer's palette (the region's mean colour is nearest to the render of the
new colour among the renders of every palette colour), per item; and how often the filter stage
kept right and wrong ones (data/pdg/filtered).

    python benchmarks/bench_filter_truth.py     # after `dvc repro filter`; writes benchmarks/results/filter_truth.json
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.config import load_params  # noqa: E402
from pipeline.data.canonical import iter_shard_samples, manifest_path, read_manifest  # noqa: E402
from pipeline.data.synthpedes import COLOR_NAMES  # noqa: E402
from pipeline.data.synthpedes.truth import KNOWN_BAD, Source, true_edit, known_bad  # noqa: E402
from pipeline.core.io import write_json_atomic  # noqa: E402
from pipeline.pdg.calibration import Calibration, calibrate_on_prepared  # noqa: E402
from pipeline.pdg.filtering import judge, score_batch  # noqa: E402
from pipeline.pdg.generate import plan_generation  # noqa: E402
from pipeline.pdg.scorers import load_scorer  # noqa: E402
from pipeline.pdg.shards import pdg_shards  # noqa: E402
from pipeline.core.devices import inference_device  # noqa: E402
from pipeline.core.runtime import machine  # noqa: E402
from pipeline.text import find_color_phrases  # noqa: E402
from pipeline.text.caption_edit import edit_captions  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "filter_truth.json"
LEVELS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
PIXEL_REASONS = ("fidelity", "blank", "noise")


def cases_of_plan(rows, pdg) -> list[tuple[str, object, str, str, list[dict]]]:
    """(key, record, source caption, edited caption, changes) of the generate stage's jobs."""
    return [(job.key, job.source, job.edit.source, job.edit.edited, [c.to_json() for c in job.edit.changes])
            for job in plan_generation(rows, pdg).jobs]


def cases_of_split(rows, num_samples: int, seed: int):
    """The same kind of cases for rows of any split: each row's first editable caption (seeded), edited."""
    chosen = []
    for position, row in enumerate(rows):
        rng = np.random.default_rng([seed, 1, position])
        index = next((int(i) for i in rng.permutation(len(row.captions)) if find_color_phrases(row.captions[i])), None)
        if index is not None:
            chosen.append((row, row.captions[index]))
    edits = edit_captions([caption for _, caption in chosen], num_samples, seed)
    return [(f"{row.key}-{k}", row, caption, edit.edited, [c.to_json() for c in edit.changes])
            for (row, caption), found in zip(chosen, edits) for k, edit in enumerate(found)]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def truth_pairs(cases, seed: int, others, scorer, cfg, calibration: Calibration, batch: int = 128):
    """kind -> [(consistency score or -inf, failed reasons)] for the true edits ("true") and each known-bad kind."""
    rng = np.random.default_rng(seed)
    samples, sources, skipped = [], {}, defaultdict(int)
    for key, record, caption, edited, changes in cases:
        source = Source.of(record, seed)
        truth, why = true_edit(source, changes)
        if truth is None:
            skipped[why] += 1
            continue
        sources[record.key] = _png(source.render())
        images = {"true": truth.image, **{kind: known_bad(kind, truth, rng, others) for kind in KNOWN_BAD}}
        for kind, image in images.items():
            if image is None:
                skipped[f"no_{kind}"] += 1
                continue
            record_json = {"source_key": record.key, "source_caption": caption, "edited_caption": edited}
            samples.append({"__key__": f"{kind}/{key}", "png": _png(image), "json": json.dumps(record_json).encode()})
    results = defaultdict(list)
    for start in range(0, len(samples), batch):
        for pair in score_batch(samples[start : start + batch], sources, scorer, calibration):
            reasons = judge(pair, cfg, calibration)
            rank = -np.inf if set(reasons) & set(PIXEL_REASONS) else pair.scores["consistency_score"]
            results[pair.key.split("/")[0]].append((rank, pair.scores, reasons))
    return results, dict(skipped)


def auc(positive, negative) -> float:
    a, b = np.array(positive)[:, None], np.array(negative)[None, :]
    return round(float((a > b).mean() + 0.5 * (a == b).mean()), 4)


def kept_at(entries, calibration: Calibration, level: float) -> float:
    """Share kept with the margin threshold at `level` of the calibration (the other criteria as judged)."""
    threshold = float(np.quantile(calibration.preference, level))
    kept = [not [r for r in reasons if r != "consistency_margin"] and scores["margin"] >= threshold
            for _, scores, reasons in entries]
    return round(float(np.mean(kept)), 4)


def filter_table(results, calibration: Calibration, level: float) -> dict:
    true_ranks = [rank for rank, _, _ in results["true"]]
    return {
        "true_edits": len(results["true"]),
        "true_edits_kept_share": kept_at(results["true"], calibration, level),
        "negatives": {kind: {"pairs": len(results[kind]), "auc": auc(true_ranks, [r for r, _, _ in results[kind]]),
                             "kept_share": kept_at(results[kind], calibration, level)}
                      for kind in KNOWN_BAD if results[kind]},
    }


def generator_quality(raw: Path, filtered: Path, cases, seed: int, scorer, calibration: Calibration) -> dict:
    """The diffusion generator's pairs against the true edits, per item (see the module docstring)."""
    by_key = {key: (record, changes) for key, record, _, _, changes in cases}
    kept = {s["__key__"] for s in iter_shard_samples(pdg_shards(filtered))} if filtered.is_dir() else set()
    samples = [s for s in iter_shard_samples(pdg_shards(raw)) if s["__key__"] in by_key]
    sources = {by_key[s["__key__"]][0].key: _png(Source.of(by_key[s["__key__"]][0], seed).render()) for s in samples}
    scores = {pair.key: pair.scores["consistency_score"] for start in range(0, len(samples), 128)
              for pair in score_batch(samples[start : start + 128], sources, scorer, calibration)}
    rows = defaultdict(lambda: defaultdict(list))
    for sample in samples:
        record, changes = by_key[sample["__key__"]]
        truth, _ = true_edit(Source.of(record, seed), changes)
        if truth is None:
            continue
        generated = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"), dtype=np.float32)
        true, source = (np.asarray(im, dtype=np.float32) for im in (truth.image, truth.source.render()))
        region = truth.region
        renders = {c: np.asarray(truth.source.render(**{truth.key: c}), dtype=np.float32)[region].mean(0)
                   for c in COLOR_NAMES if truth.key != "hair_color"}
        mean = generated[region].mean(0)
        nearest = min(renders, key=lambda c: np.linalg.norm(mean - renders[c]))
        for group in (truth.item, "all"):
            row = rows[group]
            row["inside_error"].append(np.abs(generated - true)[region].mean())
            row["outside_error"].append(np.abs(generated - true)[~region].mean())
            row["source_inside_error"].append(np.abs(source - true)[region].mean())
            row["colour_right"].append(nearest == truth.new_colour)
            row["kept"].append(sample["__key__"] in kept)
            row["score"].append(scores[sample["__key__"]])
    table = {}
    for group, row in rows.items():
        right, kept_flags = np.array(row["colour_right"]), np.array(row["kept"])
        table[group] = {
            "edits": int(right.size),
            "inside_error": round(float(np.mean(row["inside_error"])), 2),
            "outside_error": round(float(np.mean(row["outside_error"])), 2),
            "source_inside_error": round(float(np.mean(row["source_inside_error"])), 2),  # an unchanged image's
            "colour_right_share": round(float(right.mean()), 4),
            "kept_share_of_right": round(float(kept_flags[right].mean()), 4) if right.any() else None,
            "kept_share_of_wrong": round(float(kept_flags[~right].mean()), 4) if (~right).any() else None,
            # the filter's ranking: the chance a right edit scores above a wrong one (0.5: blind)
            "consistency_auc_right_vs_wrong": auc(np.array(row["score"])[right], np.array(row["score"])[~right])
            if right.any() and (~right).any() else None,
        }
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", default="data/prepared")
    parser.add_argument("--raw", default="data/pdg/raw")
    parser.add_argument("--filtered", default="data/pdg/filtered")
    parser.add_argument("--keep", type=float, default=0.9, help="share of val true edits the operating point keeps")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    started = datetime.now(timezone.utc)
    params = load_params(args.params)
    cfg, seed = params.filter, params.synth.seed
    scorer = load_scorer(cfg.scorer, inference_device())
    calibration = calibrate_on_prepared(scorer, args.prepared, cfg)
    train = read_manifest(manifest_path(args.prepared, "train"))
    val = read_manifest(manifest_path(args.prepared, "val"))
    others = {"train": [Source.of(r, seed) for r in train], "val": [Source.of(r, seed) for r in val]}
    val_results, _ = truth_pairs(cases_of_split(val, params.pdg.num_samples, params.pdg.seed), seed, others["val"],
                                 scorer, cfg, calibration)
    sweep = {level: filter_table(val_results, calibration, level) for level in LEVELS}
    chosen = max((level for level in LEVELS if sweep[level]["true_edits_kept_share"] >= args.keep), default=0.0)
    train_cases = cases_of_plan(train, params.pdg)
    train_results, skipped = truth_pairs(train_cases, seed, others["train"], scorer, cfg, calibration)
    report = {
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/bench_filter_truth.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(), "scorer": cfg.scorer, "calibration": calibration.to_json(),
        "operating_point": {"margin_level": chosen, "chosen_on": "val", "keep_target": args.keep,
                            "val_true_edits_kept_share": sweep[chosen]["true_edits_kept_share"],
                            "params_margin_level": cfg.margin_level},
        **filter_table(train_results, calibration, chosen),
        "at_params_level": filter_table(train_results, calibration, cfg.margin_level),
        "val_sweep": {str(level): {"true_edits_kept_share": t["true_edits_kept_share"],
                                   **{k: v["kept_share"] for k, v in t["negatives"].items()}}
                      for level, t in sweep.items()},
        "not_rendered": skipped,
        "generator": generator_quality(Path(args.raw), Path(args.filtered), train_cases, seed, scorer, calibration)
        if pdg_shards(args.raw) else {},
    }
    write_json_atomic(args.out, report)
    print(markdown(report))
    print(f"wrote {args.out}")
    return 0


def markdown(report: dict) -> str:
    lines = [f"operating point: margin_level {report['operating_point']['margin_level']} (chosen on val)",
             "", "| pairs | kind | ROC AUC vs true edits | kept share |", "|---|---|---|---|",
             f"| {report['true_edits']} | true edits | - | {report['true_edits_kept_share']:.3f} |"]
    lines += [f"| {v['pairs']} | {kind} | {v['auc']:.3f} | {v['kept_share']:.3f} |" for kind, v in report["negatives"].items()]
    if report["generator"]:
        lines += ["", "| item | edits | error inside | outside | unchanged inside | colour right | kept of right "
                  "| kept of wrong | AUC right vs wrong |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {item} | {r['edits']} | {r['inside_error']} | {r['outside_error']} | {r['source_inside_error']} "
                  f"| {r['colour_right_share']:.3f} | {r['kept_share_of_right']} | {r['kept_share_of_wrong']} "
                  f"| {r['consistency_auc_right_vs_wrong']} |"
                  for item, r in sorted(report["generator"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
