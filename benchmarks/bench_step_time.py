"""Training step time of the tiny dual encoder: forward + backward + AdamW at batch 64.

    python benchmarks/bench_step_time.py --size 128 64 --text-encoder bert
    python benchmarks/bench_step_time.py --size 128 64 --text-encoder minilm

Prints the median of five steps after one warm-up step (40-token captions).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.core.config import ModelConfig
from pipeline.losses import HardnessAwareContrastiveLoss
from pipeline.models import build_model, tokenize

CAPTION = "a man in a red shirt and blue jeans walking with a black backpack"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(128, 64), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--text-encoder", choices=("bert", "minilm"), default="bert")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(ModelConfig(text_encoder=args.text_encoder), tuple(args.size), captions=[CAPTION] * 50)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = HardnessAwareContrastiveLoss()
    pixels = torch.randn(args.batch, 3, *args.size)
    tokens = tokenize(model.tokenizer, [CAPTION] * args.batch, 40)
    person_ids = torch.arange(args.batch)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        image_emb, text_emb = model(pixels, tokens["input_ids"], tokens["attention_mask"])
        criterion(image_emb, text_emb, person_ids, model.temperature()).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    print(f"{args.size[0]}x{args.size[1]} {args.text_encoder}: {statistics.median(times[1:]):.3f} s/step "
          f"(batch {args.batch}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
