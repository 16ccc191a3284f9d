"""Does a trained dual encoder notice a changed colour in the text? The proximity claim, measured.

For every test caption with an editable garment or accessory colour phrase, one seeded colour
edit is made (the same caption editor as PDG: "a red jacket" -> "a green jacket"). A model is
colour sensitive on that caption when its own image scores higher with the true caption than
with the edited one. Reported per model: that share, and the mean similarity margin
s(image, true) - s(image, edited), over all edits and by what the edited phrase names (upper
garment, lower garment, anything else: shoes, bags, headwear). Proximity pairs in the batch of their source train exactly
this comparison. Run from the repository root after `dvc repro`:

    python benchmarks/bench_colour_sensitivity.py --models models/baseline/best models/pdg/best

Writes benchmarks/results/colour_sensitivity.json (or --out) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import torch

from pipeline.evaluation import embed_retrieval_split, load_retrieval_split
from pipeline.io import write_json_atomic
from pipeline.models import DualEncoder
from pipeline.models.tokenization import tokenize
from pipeline.generator.probe import LOWER_NOUNS, UPPER_NOUNS
from pipeline.text.caption_edit import edit_captions

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def embed_texts(model: DualEncoder, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenize(model.tokenizer, texts[start : start + batch_size], model.config.max_text_length)
        chunks.append(model.encode_text(tokens["input_ids"], tokens["attention_mask"]).float())
    return torch.cat(chunks)


def edited_part(phrase: str) -> str:
    """upper, lower or other, by the phrase's last word ("dark blue jeans" -> lower)."""
    noun = phrase.lower().split()[-1]
    return "upper" if noun in UPPER_NOUNS else "lower" if noun in LOWER_NOUNS else "other"


def sensitivity(true_similarity: torch.Tensor, edited_similarity: torch.Tensor) -> dict[str, float]:
    """Share (%) of captions whose own image prefers the true text, and the mean margin."""
    margin = true_similarity - edited_similarity
    return {"edits": len(margin), "prefers_true_pct": round(100.0 * (margin > 0).float().mean().item(), 2),
            "mean_margin": round(margin.mean().item(), 4)}


def sensitivity_by_part(true_similarity: torch.Tensor, edited_similarity: torch.Tensor, parts: list[str]) -> dict:
    result = {"all": sensitivity(true_similarity, edited_similarity)}
    for part in ("upper", "lower", "other"):
        mask = torch.tensor([p == part for p in parts])
        if mask.any():
            result[part] = sensitivity(true_similarity[mask], edited_similarity[mask])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["models/baseline/best", "models/pdg/best"])
    parser.add_argument("--prepared", default=str(REPO / "data" / "prepared"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "colour_sensitivity.json"))
    args = parser.parse_args()
    data = load_retrieval_split(args.prepared, "test")
    edits = edit_captions(data.captions, 1, args.seed)
    editable = [i for i, found in enumerate(edits) if found]
    edited_texts = [edits[i][0].edited for i in editable]
    parts = [edited_part(edits[i][0].changes[0].phrase_before) for i in editable]
    owners = torch.tensor([data.caption_image_index[i] for i in editable])
    results = {}
    for folder in args.models:
        model = DualEncoder.from_pretrained(folder).eval()
        text_emb, image_emb = embed_retrieval_split(model, data, 256, torch.device("cpu"))
        own_images = image_emb[owners]
        true_similarity = (text_emb[editable] * own_images).sum(1)
        edited_similarity = (embed_texts(model, edited_texts) * own_images).sum(1)
        results[folder] = sensitivity_by_part(true_similarity, edited_similarity, parts)
    write_json_atomic(args.out, {"date": date.today().isoformat(),
                                 "command": "python benchmarks/bench_colour_sensitivity.py --models " + " ".join(args.models),
                                 "captions": len(data.captions), "edited": len(editable), "models": results})
    print(f"{len(editable)} of {len(data.captions)} test captions edited\n")
    groups = list(next(iter(results.values())))
    counts = ", ".join(f"{g} {next(iter(results.values()))[g]['edits']}" for g in groups)
    print(f"own image prefers the true caption (mean margin); edits: {counts}\n")
    print("| model | " + " | ".join(groups) + " |\n" + "|---" * (len(groups) + 1) + "|")
    for folder, result in results.items():
        cells = [f"{result[g]['prefers_true_pct']}% ({result[g]['mean_margin']:+.3f})" for g in groups]
        print(f"| {folder} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as error:  # e.g. a --models folder without a saved dual encoder: one line, no traceback
        raise SystemExit(f"error: {error}")
