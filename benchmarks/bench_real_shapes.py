"""Throughput of the real profile's models at real sizes (random weights): what a GPU run costs.

    python benchmarks/bench_real_shapes.py --out benchmarks/results/gpu_check.json          # on a GPU
    python benchmarks/bench_real_shapes.py --batch 8 --steps 2 --out /tmp/cpu.json         # a CPU smoke run

Measures, on the GPU when there is one:
- training pairs/s of the CLIP ViT-B/16 preset at 384x128, forward + loss + backward + AdamW, in
  bf16 autocast on a GPU that has it (fp16 else; float32 on a CPU), at `--batch` (128);
- UNet evaluations/s of a Stable Diffusion 1.5 UNet at the real profile's 512x192 canvas (64x24
  latents) in `pdg.precision: auto`'s dtype, at the rows one p2p group makes (2 (1 + K), K = 2);
- p2p edits/s: `edit_p2p_batch` with negative-prompt inversion on `--sources` crops x 2 edits at
  `--steps` DDIM steps (50 on a GPU) and guidance 7.5, with the UNet rows it made;
- peak GPU memory of each part.
Checkpoint folders are built with random weights (tests/real_shapes.py) unless given.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pipeline.core.config import ModelConfig  # noqa: E402
from pipeline.losses import HardnessAwareContrastiveLoss  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.models.tokenization import tokenize  # noqa: E402
from pipeline.pdg.cost import count_unet  # noqa: E402
from pipeline.editing.edit import EditRequest, edit_p2p_batch  # noqa: E402
from pipeline.editing.settings import EditSettings  # noqa: E402
from pipeline.generator.model import load_generator  # noqa: E402

CAPTION = "a woman in a red coat and black trousers with a black backpack, walking on the street"
EDITED = ("a woman in a green coat and black trousers with a black backpack, walking on the street",
          "a woman in a blue coat and black trousers with a black backpack, walking on the street")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def train_throughput(clip: Path, device: torch.device, batch: int, steps: int) -> dict:
    model = build_model(ModelConfig(preset="clip-vit-b16", embed_dim=512, max_text_length=77,
                                    vision_path=str(clip), text_path=str(clip)), (384, 128))
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    criterion = HardnessAwareContrastiveLoss()
    amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    pixels = torch.randn(batch, 3, 384, 128, device=device)
    tokens = {k: v.to(device) for k, v in tokenize(model.tokenizer, [CAPTION] * batch, 77).items()}
    person_ids = torch.arange(batch, device=device)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp == torch.float16)
    _reset_peak(device)
    times = []
    for step in range(steps + 1):  # the first step warms up
        _sync(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=device.type == "cuda"):
            image_emb, text_emb = model(pixels, tokens["input_ids"], tokens["attention_mask"])
        loss = criterion(image_emb.float(), text_emb.float(), person_ids, model.temperature())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step:
            times.append(time.perf_counter() - started)
    seconds = sum(times) / len(times)
    return {"batch": batch, "autocast": str(amp) if device.type == "cuda" else "float32",
            "step_seconds": round(seconds, 4), "pairs_per_s": round(batch / seconds, 1), "peak_gib": _peak_gib(device)}


def unet_throughput(parts, device: torch.device, rows: int, calls: int) -> dict:
    width, height = parts.image_size
    factor = parts.vae_scale_factor
    latents = torch.randn(rows, 4, height // factor, width // factor, device=device)
    text = torch.randn(rows, 77, parts.text_encoder.config.hidden_size, device=device)
    timestep = torch.tensor(500, device=device)
    _reset_peak(device)
    with torch.no_grad():
        parts.predict_noise(latents, timestep, text)  # warm-up
        _sync(device)
        started = time.perf_counter()
        for _ in range(calls):
            parts.predict_noise(latents, timestep, text)
        _sync(device)
    seconds = time.perf_counter() - started
    return {"rows_per_call": rows, "latents": [height // factor, width // factor], "dtype": str(parts.dtype),
            "unet_evaluations_per_s": round(rows * calls / seconds, 2), "peak_gib": _peak_gib(device)}


def edit_throughput(parts, device: torch.device, sources: int, steps: int) -> dict:
    crop = Image.new("RGB", (64, 160), (120, 40, 40))
    requests = []
    for index in range(sources):
        image = crop.copy()
        image.putpixel((0, 0), (index, 0, 0))  # distinct sources, one group each
        for edited in EDITED:
            requests.append(EditRequest(image, CAPTION, edited, [(_span(CAPTION, "red"), _span(edited, edited.split()[4]))]))
    _reset_peak(device)
    with count_unet(parts) as count:
        _sync(device)
        started = time.perf_counter()
        edit_p2p_batch(parts, requests, EditSettings(
            num_steps=steps, guidance=7.5, inversion="negative-prompt", null_text_steps=0, cross_replace_fraction=0.8,
            self_replace_fraction=0.4, blend_threshold=0.3, blend_start_fraction=0.2, reweight=2.0, strength=0.6,
        ))
        _sync(device)
    seconds = time.perf_counter() - started
    return {"sources": sources, "edits": len(requests), "steps": steps, "seconds": round(seconds, 2),
            "edits_per_s": round(len(requests) / seconds, 3), "unet_evaluations": count.rows,
            "unet_evaluations_per_s": round(count.rows / seconds, 2), "peak_gib": _peak_gib(device)}


def _span(text: str, word: str) -> tuple[int, int]:
    start = text.index(f" {word} ") + 1
    return start, start + len(word)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, help="a CLIP ViT-B/16 folder (default: random weights)")
    parser.add_argument("--sd", type=Path, help="a Stable Diffusion 1.5 folder (default: random weights)")
    parser.add_argument("--batch", type=int, default=128, help="training batch (default 128)")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--unet-calls", type=int, default=20)
    parser.add_argument("--sources", type=int, default=4, help="p2p sources, 2 edits each (default 4)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the p2p edit (default 50)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        from real_shapes import save_clip_vit_b16, save_sd15

        clip = args.clip or save_clip_vit_b16(Path(scratch) / "clip")
        sd = args.sd or save_sd15(Path(scratch) / "sd")
        result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                  "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        result["train"] = train_throughput(clip, device, args.batch, args.train_steps)
        print(json.dumps({"train": result["train"]}), flush=True)
        torch.cuda.empty_cache() if device.type == "cuda" else None
        parts = load_generator(sd, device, "auto", canvas=(192, 512))
        result["unet"] = unet_throughput(parts, device, rows=6, calls=args.unet_calls)
        print(json.dumps({"unet": result["unet"]}), flush=True)
        result["p2p"] = edit_throughput(parts, device, args.sources, args.steps)
        print(json.dumps({"p2p": result["p2p"]}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
