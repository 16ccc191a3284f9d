"""Where models run and in what precision: the one place that asks whether there is a GPU.

Training and generation place themselves through Accelerate (`training_precision` picks its mixed
precision). The stages that only run models (evaluate, index, filter, caption, search) put them on
`inference_device()`. Pretrained models run inference in `inference_dtype`, the generator in
`generator_dtype` (`pdg.precision`)."""

from __future__ import annotations

import torch

GENERATOR_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def has_gpu() -> bool:
    return torch.cuda.is_available()


def inference_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if has_gpu() else "cpu")


def inference_dtype(device: str | torch.device) -> torch.dtype:
    """float16 on a GPU, float32 on a CPU (where half precision is slow or missing)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def generator_dtype(precision: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """`pdg.precision` as a dtype. auto is `inference_dtype(device)`."""
    if isinstance(precision, torch.dtype):
        return precision
    if precision == "auto":
        return inference_dtype(device)
    return GENERATOR_DTYPES[precision]


def training_precision(choice: str, cpu: bool = False) -> str:
    """`train.mixed_precision` as Accelerate takes it. auto is bf16 on a GPU that has it, fp16 on
    another GPU and no on the CPU."""
    if choice != "auto":
        return choice
    if cpu or not has_gpu():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
