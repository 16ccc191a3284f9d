"""The attribute check, a diagnostic of the filter on SynthPedes: does it keep the colour edits that worked?

The attribute probe that train_generator trains on SynthPedes' colour labels (models/probe) reads
the top and bottom of every generated pair whose edit it can judge (a single change recolouring
the top or the visible bottom, from the colour the source really has: experiments/edit_check.py)
and confirms the edit or finds it wrong. This script reports how often it confirms the pairs the
filter kept and those it rejected, and `margin_auc`: the chance that a confirmed edit has a larger
consistency margin than a wrong one (0.5: the margin is blind to whether the colour edit worked).

    python -m experiments.attribute_check        # after `dvc repro filter`; writes experiments/results/attribute_check.json

It scores every generated pair (data/pdg/raw) as the filter stage does, with the params' `filter`
and its scorer, and checks the verdicts against what the stage wrote (data/pdg/filtered): the kept
keys must agree, and so must the scores the stage stored. The record: docs/results.md.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from experiments.edit_check import AttributeChecker, colour_edit
from pipeline.core.config import FilterConfig, load_params
from pipeline.data.canonical import iter_shard_samples, manifest_path, read_manifest
from pipeline.generator.probe import CONFIG_FILE, AttributeProbe
from pipeline.core.io import write_json_atomic
from pipeline.pdg.calibration import Calibration, calibrate_on_prepared
from pipeline.pdg.filtering import ScoredPair, filter_pairs, read_generated, referenced_sources, written
from pipeline.pdg.shards import load_source_images, pdg_shards
from pipeline.pdg.scorers import Scorer, load_scorer
from pipeline.core.devices import inference_device
from pipeline.core.runtime import machine

OUT = Path(__file__).resolve().parent / "results" / "attribute_check.json"


def attribute_summary(pairs: list[ScoredPair], verdicts: dict[str, bool | None], enabled: bool) -> dict:
    """How often the probe confirms the edits of kept and of rejected pairs, and how well the
    consistency margin alone tells confirmed from wrong edits (`verdicts` by pair key; None: not judged)."""
    judged = [p for p in pairs if verdicts[p.key] is not None]
    kept = [p for p in judged if written(p, enabled)]
    rejected = [p for p in judged if not written(p, enabled)]

    def confirmed_percent(group: list[ScoredPair]) -> float | None:
        return round(100.0 * sum(bool(verdicts[p.key]) for p in group) / len(group), 2) if group else None

    return {
        "judged": len(judged), "not_judged": len(pairs) - len(judged),
        "judged_kept": len(kept), "judged_rejected": len(rejected),
        "confirmed_percent": {"all": confirmed_percent(judged), "kept": confirmed_percent(kept),
                              "rejected": confirmed_percent(rejected)},
        "margin_auc": margin_auc([p.scores["margin"] for p in judged if verdicts[p.key]],
                                 [p.scores["margin"] for p in judged if not verdicts[p.key]]),
    }


def margin_auc(confirmed: list[float], wrong: list[float]) -> float | None:
    """Chance that a confirmed edit's margin exceeds a wrong one's (ties count half)."""
    if not confirmed or not wrong:
        return None
    a, b = np.array(confirmed)[:, None], np.array(wrong)[None, :]
    return round(float((a > b).mean() + 0.5 * (a == b).mean()), 4)


def attribute_check(
    samples: list[dict[str, bytes]], sources: dict[str, bytes], scorer: Scorer, cfg: FilterConfig,
    calibration: Calibration, checker: AttributeChecker, show_progress: bool = False,
) -> tuple[list[ScoredPair], dict]:
    """The filter's pairs (scored and judged as the stage does) and the attribute check's report."""
    pairs = filter_pairs(samples, sources, scorer, cfg, calibration, show_progress=show_progress)
    verdicts = {}
    for start in range(0, len(pairs), cfg.batch_size):
        batch = pairs[start : start + cfg.batch_size]
        images = [Image.open(io.BytesIO(p.members["png"])).convert("RGB") for p in batch]
        verdicts.update(zip((p.key for p in batch), checker.verdicts([p.record for p in batch], images)))
    why_not = Counter(colour_edit(p.record["changes"], checker.attributes_by_source.get(p.record["source_key"], {}))[1]
                      for p in pairs if verdicts[p.key] is None)
    return pairs, {**attribute_summary(pairs, verdicts, cfg.enabled), "not_judged_because": dict(sorted(why_not.items()))}


def agreement(pairs: list[ScoredPair], filtered: Path, enabled: bool) -> dict:
    """Whether this run keeps what the filter stage wrote to `filtered`, with the same scores."""
    stored = {s["__key__"]: json.loads(s["json"])["filter_scores"] for s in iter_shard_samples(pdg_shards(filtered))}
    ours = {p.key: p.scores for p in pairs if written(p, enabled)}
    common = set(stored) & set(ours)
    gap = max((abs(stored[k][name] - ours[k][name]) for k in common for name in stored[k]), default=0.0)
    return {"kept_keys_agree": set(stored) == set(ours), "stage_kept": len(stored), "kept": len(ours),
            "max_score_difference": round(gap, 5)}


def markdown(report: dict) -> str:
    check, pct = report["attribute_check"], report["attribute_check"]["confirmed_percent"]

    def fmt(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    return "\n".join([
        "| pairs | judged (kept / rejected) | confirmed % all | kept | rejected | margin AUC |",
        "|---|---|---|---|---|---|",
        f"| {report['pairs']} | {check['judged']} ({check['judged_kept']} / {check['judged_rejected']}) "
        f"| {fmt(pct['all'])} | {fmt(pct['kept'])} | {fmt(pct['rejected'])} | {fmt(check['margin_auc'], 4)} |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", default="data/pdg/raw", help="the generate stage's pairs")
    parser.add_argument("--filtered", default="data/pdg/filtered", help="what the filter stage kept")
    parser.add_argument("--prepared", default="data/prepared", help="the sources: images and colour labels")
    parser.add_argument("--probe", default="models/probe", help="train_generator's attribute probe")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    started = datetime.now(timezone.utc)
    cfg = load_params(args.params).filter
    probe = Path(args.probe)
    if not (probe / CONFIG_FILE).is_file():
        sys.exit(f"{probe} holds no attribute probe: run `dvc repro train_generator` (embedded SynthPedes profile)")
    rows = read_manifest(manifest_path(args.prepared, "train"))
    attributes = {row.key: json.loads(row.attributes) for row in rows if row.attributes}
    if not any(a.get("upper_color") for a in attributes.values()):
        sys.exit(f"the train split of {args.prepared} has no colour labels (SynthPedes only)")
    samples = read_generated(pdg_shards(args.raw))
    if not samples:
        sys.exit(f"no generated pairs in {args.raw}: run `dvc repro generate`")
    sources = load_source_images(args.prepared, referenced_sources(samples))
    scorer = load_scorer(cfg.scorer, inference_device())
    calibration = calibrate_on_prepared(scorer, args.prepared, cfg)
    pairs, check = attribute_check(samples, sources, scorer, cfg, calibration,
                                   AttributeChecker(AttributeProbe.load(probe), attributes), show_progress=True)
    report = {
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "experiments.attribute_check", *(argv if argv is not None else sys.argv[1:])]),
        "inputs": {"raw": args.raw, "filtered": args.filtered, "prepared": args.prepared, "probe": args.probe,
                   "scorer": cfg.scorer},
        "machine": machine(),
        "pairs": len(pairs),
        "filter_stage": agreement(pairs, Path(args.filtered), cfg.enabled),
        "attribute_check": check,
    }
    write_json_atomic(args.out, report)
    print(markdown(report))
    print(f"filter stage: {report['filter_stage']}; not judged because: {check['not_judged_because']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
