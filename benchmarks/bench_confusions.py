"""What the rank-1 mistakes of trained models get wrong, by SynthPedes attribute.

For each test query whose top-ranked gallery image shows another person, compares that image's
attributes with those of the query's own image. Reported per model: the mistakes, and the share
of them where each attribute differs; in particular how often the top-ranked person has another
colour on a garment that the caption names in colour ("a red shirt" retrieving a blue shirt):
the confusion that colour-edited proximity pairs are meant to teach away. A last row gives the
same shares for a gallery image of another person drawn at random (all such pairs). Needs data with
SynthPedes attributes (the embedded default). Run from the repository root after `dvc repro`:

    python benchmarks/bench_confusions.py --models models/baseline/best models/pdg/best

Writes benchmarks/results/confusions.json (or --out) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import torch

from pipeline.data.canonical import iter_shard_samples, list_shards
from pipeline.evaluation import evaluate_retrieval, load_retrieval_split
from pipeline.io import write_json_atomic
from pipeline.models import DualEncoder
from pipeline.pdg.probe import LOWER_NOUNS, UPPER_NOUNS, names_colour

REPO = Path(__file__).resolve().parents[1]
ATTRIBUTES = ("upper_color", "lower_color", "upper_type", "lower_type", "shoe_color", "bag_type", "bag_color",
              "headwear_type", "hair_color", "gender")


def test_attributes(prepared: Path) -> list[dict[str, str]]:
    """The attributes of every test image, in the order `load_retrieval_split` reads them."""
    rows = [json.loads(sample["json"]) for sample in iter_shard_samples(list_shards(prepared, "test"))]
    if not all(row.get("attributes") for row in rows):
        raise SystemExit(f"{prepared}: the test images carry no attributes (SynthPedes only)")
    return [json.loads(row["attributes"]) for row in rows]


def named_colour_missed(caption: str, truth: dict[str, str], retrieved: dict[str, str]) -> dict[str, bool]:
    """Per garment: the caption names its colour and the retrieved person wears another one."""
    return {
        garment: names_colour(caption, truth[f"{garment}_color"], nouns)
        and retrieved[f"{garment}_color"] != truth[f"{garment}_color"]
        for garment, nouns in (("upper", UPPER_NOUNS), ("lower", LOWER_NOUNS))
    }


def confusions(similarity: torch.Tensor, data, attributes: list[dict[str, str]]) -> dict:
    top = similarity.argmax(1).tolist()  # ties go to the lower gallery index, as in the metrics
    wrong = [q for q, g in enumerate(top) if data.image_pids[g] != data.caption_pids[q]]
    differs = {name: 0 for name in ATTRIBUTES}
    missed = {"upper": 0, "lower": 0, "either": 0}
    for query in wrong:
        truth, retrieved = attributes[data.caption_image_index[query]], attributes[top[query]]
        for name in ATTRIBUTES:
            differs[name] += truth.get(name) != retrieved.get(name)
        garments = named_colour_missed(data.captions[query].lower(), truth, retrieved)
        missed["upper"] += garments["upper"]
        missed["lower"] += garments["lower"]
        missed["either"] += garments["upper"] or garments["lower"]
    share = lambda count: round(100.0 * count / max(1, len(wrong)), 1)  # noqa: E731
    return {
        "queries": len(top),
        "rank1_mistakes": len(wrong),
        "attribute_differs_pct": {name: share(count) for name, count in differs.items()},
        "named_colour_missed_pct": {name: share(count) for name, count in missed.items()},
    }


def chance(data, attributes: list[dict[str, str]]) -> dict:
    """The same shares for a gallery image of another person drawn at random (all pairs)."""
    owners = torch.tensor(data.caption_image_index)
    other = data.caption_pids[:, None] != data.image_pids[None, :]  # (queries, gallery)
    def differs(name: str) -> torch.Tensor:
        values = [row.get(name) for row in attributes]
        codes = torch.tensor([sorted(set(map(str, values))).index(str(v)) for v in values])
        return codes[owners][:, None] != codes[None, :]
    share = lambda mask: round(100.0 * (mask & other).sum().item() / other.sum().item(), 1)  # noqa: E731
    missed = {}
    for garment, nouns in (("upper", UPPER_NOUNS), ("lower", LOWER_NOUNS)):
        named = torch.tensor([names_colour(c.lower(), attributes[o][f"{garment}_color"], nouns)
                              for c, o in zip(data.captions, data.caption_image_index)])
        missed[garment] = named[:, None] & differs(f"{garment}_color")
    return {
        "attribute_differs_pct": {name: share(differs(name)) for name in ATTRIBUTES},
        "named_colour_missed_pct": {"upper": share(missed["upper"]), "lower": share(missed["lower"]),
                                    "either": share(missed["upper"] | missed["lower"])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["models/baseline/best", "models/pdg/best"])
    parser.add_argument("--prepared", default=str(REPO / "data" / "prepared"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "confusions.json"))
    args = parser.parse_args()
    data = load_retrieval_split(args.prepared, "test")
    attributes = test_attributes(Path(args.prepared))
    results = {}
    for folder in args.models:
        model = DualEncoder.from_pretrained(folder).eval()
        _, similarity = evaluate_retrieval(model, data, 256, torch.device("cpu"))
        results[folder] = confusions(similarity, data, attributes)
    reference = chance(data, attributes)
    write_json_atomic(args.out, {"date": date.today().isoformat(), "command": "python benchmarks/bench_confusions.py "
                                 + " ".join(["--models", *args.models]), "models": results,
                                 "random_other_person": reference})
    names = [*ATTRIBUTES, "named colour missed: upper", "lower", "either"]
    print("| model | rank-1 mistakes | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for folder, result in results.items():
        cells = [*result["attribute_differs_pct"].values(), *result["named_colour_missed_pct"].values()]
        print(f"| {folder} | {result['rank1_mistakes']} of {result['queries']} | " + " | ".join(f"{c}%" for c in cells) + " |")
    cells = [*reference["attribute_differs_pct"].values(), *reference["named_colour_missed_pct"].values()]
    print("| another person at random | - | " + " | ".join(f"{c}%" for c in cells) + " |")


if __name__ == "__main__":
    main()
