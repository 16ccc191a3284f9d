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
from pipeline.core.io import write_json_atomic
from pipeline.models import DualEncoder
from pipeline.generator.probe import LOWER_NOUNS, UPPER_NOUNS, names_colour

REPO = Path(__file__).resolve().parents[1]
GARMENT_NOUNS = (("upper", UPPER_NOUNS), ("lower", LOWER_NOUNS))
ATTRIBUTES = ("upper_color", "lower_color", "upper_type", "lower_type", "shoe_color", "bag_type", "bag_color",
              "headwear_type", "hair_color", "gender")


def test_attributes(prepared: Path) -> list[dict[str, str]]:
    """The attributes of every test image, in the order `load_retrieval_split` reads them."""
    rows = [json.loads(sample["json"]) for sample in iter_shard_samples(list_shards(prepared, "test"))]
    if not all(row.get("attributes") for row in rows):
        raise SystemExit(f"{prepared}: the test images carry no attributes (SynthPedes only)")
    return [json.loads(row["attributes"]) for row in rows]


def names_garment_colour(data, attributes: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """Per garment, per query: whether the caption names the colour its person wears there."""
    return {
        garment: torch.tensor([names_colour(caption.lower(), attributes[owner][f"{garment}_color"], nouns)
                               for caption, owner in zip(data.captions, data.caption_image_index)])
        for garment, nouns in GARMENT_NOUNS
    }


def attribute_codes(attributes: list[dict[str, str]], name: str) -> torch.Tensor:
    """One integer per gallery image for an attribute's value (missing values are a value too)."""
    values = [str(row.get(name)) for row in attributes]
    vocabulary = {value: code for code, value in enumerate(sorted(set(values)))}
    return torch.tensor([vocabulary[value] for value in values])


def shares(differs: dict[str, torch.Tensor], named: dict[str, torch.Tensor], pairs: torch.Tensor) -> dict:
    """Percentages over the (query, gallery image) pairs selected by `pairs`: per attribute, where
    it differs; per garment (and either), where a colour the caption names differs."""
    def share(mask: torch.Tensor) -> float:
        return round(100.0 * (mask & pairs).sum().item() / max(1, pairs.sum().item()), 1)
    missed = {garment: named[garment][:, None] & differs[f"{garment}_color"] for garment, _ in GARMENT_NOUNS}
    return {
        "attribute_differs_pct": {name: share(mask) for name, mask in differs.items()},
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
    owners = torch.tensor(data.caption_image_index)
    # (queries, gallery): does the gallery image differ from the query's own image in each attribute
    differs = {}
    for name in ATTRIBUTES:
        codes = attribute_codes(attributes, name)
        differs[name] = codes[owners][:, None] != codes[None, :]
    named = names_garment_colour(data, attributes)
    results = {}
    for folder in args.models:
        model = DualEncoder.from_pretrained(folder).eval()
        _, similarity = evaluate_retrieval(model, data, 256, torch.device("cpu"))
        top = similarity.argmax(1)  # the first of tied maxima: ties go to the lower gallery index, as in the metrics
        mistakes = data.image_pids[top] != data.caption_pids
        top_pairs = torch.zeros_like(differs["gender"]).scatter_(1, top[:, None], True) & mistakes[:, None]
        results[folder] = {"queries": len(top), "rank1_mistakes": int(mistakes.sum()),
                           **shares(differs, named, top_pairs)}
    reference = shares(differs, named, data.caption_pids[:, None] != data.image_pids[None, :])
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
    try:
        main()
    except FileNotFoundError as error:  # e.g. a --models folder without a saved dual encoder: one line, no traceback
        raise SystemExit(f"error: {error}")
