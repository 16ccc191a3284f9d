"""What the training loop optimises with: parameter groups, the learning-rate schedule and precision.

- AdamW parameter groups, with the heads at their own rate.
- The warm-up + cosine learning-rate schedule.
- The mixed precision Accelerate runs in."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

from pipeline.core.config import Params
from pipeline.core.devices import has_gpu, training_precision
from pipeline.core.distributed import accelerator_for
from pipeline.models import DualEncoder


def lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float):
    """The one learning-rate schedule of every loop here (the dual encoder's and the generator's):
    linear warm-up over `warmup_fraction` of the steps (at least one), then cosine to zero."""
    warmup = max(1, int(warmup_fraction * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup))


def head_parameters(model: DualEncoder) -> set[int]:
    """Ids of the parameters no pretrained checkpoint provides: the dual encoder's own projections
    (when they are Linear layers, not CLIP's Identity) and the learnable temperature."""
    heads = [m for m in (model.image_projection, model.text_projection) if isinstance(m, torch.nn.Linear)]
    ids = {id(p) for module in heads for p in module.parameters()}
    if isinstance(model.log_temperature, torch.nn.Parameter):
        ids.add(id(model.log_temperature))
    return ids


def build_optimizer(model: DualEncoder, cfg) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases, norms and the temperature.

    The heads (`head_parameters`) train at train.head_lr when it is set and differs from train.lr.
    The groups come in this order, with empty ones left out.
    - Decay, then no decay, for the towers. Without a separate head rate they hold every parameter.
    - The heads' decay, then the heads' no decay."""
    head_lr = cfg.head_lr or cfg.lr
    heads = head_parameters(model) if head_lr != cfg.lr else set()
    decay, no_decay, head_decay, head_no_decay = [], [], [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            if id(parameter) in heads:
                (head_no_decay if parameter.ndim < 2 else head_decay).append(parameter)
            else:
                (no_decay if parameter.ndim < 2 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if heads:
        groups = [g for g in groups if g["params"]] + [
            g for g in ({"params": head_decay, "weight_decay": cfg.weight_decay, "lr": head_lr},
                        {"params": head_no_decay, "weight_decay": 0.0, "lr": head_lr}) if g["params"]
        ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_accelerator(params: Params, cpu: bool = False) -> Accelerator:
    cpu = cpu or not has_gpu()
    return accelerator_for(cpu, training_precision(params.train.mixed_precision, cpu))
