"""Coverage and speed of colour caption editing on the 6,156 real CUHK-PEDES test captions.

Coverage: share of captions with at least one editable colour phrase (goal >= 85%).
Throughput: captions/s of `edit_captions(captions, num=1, seed)` (parse + sample + edit),
median over repeats. Captions without an editable phrase are counted by reason. Writes
benchmarks/results/caption_edit.json.

    python benchmarks/bench_caption_edit.py [--repeats 5] [--seed 0]
    python benchmarks/bench_caption_edit.py --review-sample 100 > candidates.jsonl

The second form draws the edits to review by hand (tests/data/reviewed_edits.jsonl): caption
i of a seeded permutation is edited with `edit_caption(caption, default_rng([seed, i]))`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.text import edit_caption, edit_captions, find_color_phrases  # noqa: E402
from pipeline.text.color_phrases import word_tokens  # noqa: E402
from pipeline.text.lexicon import COLOR_FAMILY, SHADE_MODIFIERS  # noqa: E402

FIXTURES = Path(os.environ.get("TBPS_FIXTURES", REPO.parent / "shared" / "fixtures"))
ANNOTATIONS = FIXTURES / "cuhk-pedes-test-annotations" / "test_reid.json"
RESULTS = REPO / "benchmarks" / "results" / "caption_edit.json"
COVERAGE_GOAL = 0.85


def load_captions(path: Path = ANNOTATIONS) -> list[str]:
    return [caption for record in json.loads(path.read_text()) for caption in record["captions"]]


def no_phrase_reason(caption: str) -> str:
    """Why a caption without an editable phrase has none, from the most to the least specific."""
    words = {token.lower for token in word_tokens(caption)}
    if find_color_phrases(caption, allow_hair=True):
        return "only hair colour"
    if words & COLOR_FAMILY.keys():
        return "colour not bound to a garment (logo, object, 'dressed in black', person)"
    if words & SHADE_MODIFIERS:
        return "only dark/light, no specific colour"
    return "no colour word"


def measure(captions: list[str], seed: int, repeats: int) -> dict:
    covered = [bool(find_color_phrases(caption)) for caption in captions]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        edits = edit_captions(captions, num=1, seed=seed)
        times.append(time.perf_counter() - start)
    reasons = Counter(no_phrase_reason(c) for c, ok in zip(captions, covered) if not ok)
    return {
        "captions": len(captions),
        "covered": sum(covered),
        "coverage": round(sum(covered) / len(captions), 4),
        "coverage_goal": COVERAGE_GOAL,
        "edits": sum(len(caption_edits) for caption_edits in edits),
        "phrases_per_caption": round(sum(len(find_color_phrases(c)) for c in captions) / len(captions), 3),
        "captions_per_s": round(len(captions) / statistics.median(times), 1),
        "seconds_median": round(statistics.median(times), 4),
        "repeats": repeats,
        "seed": seed,
        "no_phrase_reasons": dict(reasons.most_common()),
    }


def review_sample(captions: list[str], size: int, seed: int) -> list[dict]:
    samples = []
    for index in np.random.default_rng(seed).permutation(len(captions)).tolist():
        edit = edit_caption(captions[index], np.random.default_rng([seed, index]))
        if edit is not None:
            change = edit.changes[0]
            samples.append({
                "index": index, "seed": seed, "source": edit.source, "edited": edit.edited,
                "phrase_before": change.phrase_before, "phrase_after": change.phrase_after,
            })
        if len(samples) == size:
            break
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--review-sample", type=int, metavar="N", help="print N edits to review as JSON lines")
    args = parser.parse_args()
    if not ANNOTATIONS.is_file():
        print(f"bench_caption_edit: {ANNOTATIONS} not found (set TBPS_FIXTURES)", file=sys.stderr)
        return 2
    captions = load_captions()
    if args.review_sample:
        for sample in review_sample(captions, args.review_sample, args.seed):
            print(json.dumps(sample, ensure_ascii=False))
        return 0
    result = {
        "benchmark": "caption_edit",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "annotations": "cuhk-pedes-test-annotations/test_reid.json",
        **measure(captions, args.seed, args.repeats),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
