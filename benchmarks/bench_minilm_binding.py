"""Which MiniLM layer still tells which colour belongs to which garment.

For sentences naming two garments in two different colours (every ordered pair of 10 colours,
4 templates, random garment nouns), a linear read-out (least squares onto one-hot colours) is
fitted on half of them from each garment noun's hidden state at one layer, and tested on the
other half: the share of held-out sentences where the top's noun gives the top's colour and the
trousers' noun the trousers' colour. A UNet that cross-attends to the prompt states can only
paint the trousers right if the states say so; this is why the embedded generator reads an
intermediate layer (`generator.minilm_layers`). Runs in seconds:

    python benchmarks/bench_minilm_binding.py

Writes benchmarks/results/minilm_binding.json (or --out) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import random
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertModel

from pipeline.core.io import write_json_atomic
from pipeline.models import minilm_path

REPO = Path(__file__).resolve().parents[1]
COLOURS = ("red", "blue", "green", "black", "white", "pink", "purple", "yellow", "gray", "brown")
TOPS = ("jumper", "shirt", "jacket", "coat", "sweater")
BOTTOMS = ("trousers", "pants", "jeans", "shorts", "skirt")
TEMPLATES = (
    "a woman wearing a {top_colour} {top} and {bottom_colour} {bottom} with black shoes",
    "the man has short hair. he wears a {top_colour} {top}, {bottom_colour} {bottom} and white sneakers.",
    "this person is walking. the person is wearing a long sleeved {top_colour} {top} . "
    "the person is also wearing {bottom_colour} {bottom} and carrying a bag",
    "a young man in {bottom_colour} {bottom} and a {top_colour} {top} is carrying a backpack",
)


def sentences(seed: int) -> list[tuple[str, str, str, str, str]]:
    """(text, top noun, top colour, bottom noun, bottom colour), shuffled."""
    rng = random.Random(seed)
    rows = []
    for top_colour, bottom_colour in itertools.permutations(COLOURS, 2):
        for template in TEMPLATES:
            top, bottom = rng.choice(TOPS), rng.choice(BOTTOMS)
            text = template.format(top_colour=top_colour, top=top, bottom_colour=bottom_colour, bottom=bottom)
            rows.append((text, top, top_colour, bottom, bottom_colour))
    rng.shuffle(rows)
    return rows


@torch.no_grad()
def noun_states(model: BertModel, tokenizer, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (layers + 1, sentences, width) at the top's and at the bottom's noun."""
    tops, bottoms = [], []
    for text, top, _, bottom, _ in rows:
        encoded = tokenizer(text, return_tensors="pt")
        tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids[0].tolist())
        states = torch.stack(model(**encoded, output_hidden_states=True).hidden_states)[:, 0]
        tops.append(states[:, tokens.index(top)])
        bottoms.append(states[:, tokens.index(bottom)])
    return torch.stack(tops, 1), torch.stack(bottoms, 1)


def readout_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """Held-out accuracy (%) of a least-squares linear map from states to one-hot colours."""
    def with_bias(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.ones(len(x), 1)], 1)
    weights = torch.linalg.lstsq(with_bias(train_x), F.one_hot(train_y, len(COLOURS)).float()).solution
    return 100.0 * (with_bias(test_x) @ weights).argmax(1).eq(test_y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "minilm_binding.json"))
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = BertModel.from_pretrained(minilm_path()).eval()
    rows = sentences(args.seed)
    top_states, bottom_states = noun_states(model, tokenizer, rows)
    top_colours = torch.tensor([COLOURS.index(r[2]) for r in rows])
    bottom_colours = torch.tensor([COLOURS.index(r[4]) for r in rows])
    half = len(rows) // 2
    layers = []
    print("| layer | top noun -> top colour | bottom noun -> bottom colour |\n|---|---|---|")
    for layer in range(1, len(top_states)):
        top = readout_accuracy(top_states[layer, :half], top_colours[:half], top_states[layer, half:], top_colours[half:])
        bottom = readout_accuracy(bottom_states[layer, :half], bottom_colours[:half],
                                  bottom_states[layer, half:], bottom_colours[half:])
        layers.append({"layer": layer, "top": top, "bottom": bottom})
        print(f"| {layer} | {top:.1f}% | {bottom:.1f}% |")
    write_json_atomic(args.out, {"date": date.today().isoformat(), "command": "python benchmarks/bench_minilm_binding.py",
                                 "sentences": len(rows), "held_out": len(rows) - half, "layers": layers})


if __name__ == "__main__":
    main()
