"""What proximity data generation costs, in UNet evaluations: the formula and a hook that counts them.

A UNet evaluation is one row of one UNet forward call, that is, one entry of its batch dimension.
Classifier-free guidance makes each denoised latent two rows (unconditional and conditional).

Notation:
- T = num_steps.
- "guided" means guidance > 1. Then passes = 2, else passes = 1.
- A p2p batch's jobs form G groups. A group is the K_g samples of one source caption. E = sum K_g edits.

Such a p2p batch costs the sum of three parts.
- Inversion costs T * G rows. DDIM inversion runs the conditional pass only, once per group.
- Null-text (guided only) costs at most T * G * (null_text_steps + 2). Per step this is one
  conditional pass, up to null_text_steps unconditional passes in the Adam loop, and one
  unconditional pass for the step taken. The conditional pass for that step is reused. The Adam
  loop's early stop may end it after the first iteration, so this is an upper bound.
  Negative-prompt and ddim add nothing here.
- Joint denoising costs T * (G + E) * passes. There is one source row per group and one row per edit.

img2img costs min(round(strength * T), T) * passes per job. The batches are those that
`generate.shard_batches` cuts. So `plan_unet_evaluations` is exact for the code as written, and an
upper bound with null-text. `count_unet` measures the same quantity with a forward hook.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from pipeline.core.config import PdgConfig
from pipeline.pdg.generate import EditFunction, GenerationPlan, job_groups, shard_batches


@dataclass
class UnetCount:
    calls: int = 0  # UNet forward calls
    rows: int = 0  # UNet evaluations: the rows of those calls
    latent_sizes: set[tuple[int, int]] = field(default_factory=set)  # (height, width) of the latents seen


@contextmanager
def count_unet(parts_or_unet) -> Iterator[UnetCount]:
    """Counts the forward calls and rows of a `DiffusionParts`' UNet (or a UNet) while the block runs."""
    unet = getattr(parts_or_unet, "unet", parts_or_unet)
    count = UnetCount()

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        count.calls += 1
        count.rows += int(sample.shape[0])
        count.latent_sizes.add(tuple(int(side) for side in sample.shape[2:]))

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


def batch_unet_evaluations(cfg: PdgConfig, group_sizes: Sequence[int]) -> int:
    """UNet rows of one edit batch made of groups of these sizes (an upper bound with null-text)."""
    steps, passes = cfg.num_steps, 2 if cfg.guidance != 1 else 1
    groups, edits = len(group_sizes), sum(group_sizes)
    if cfg.method == "oracle":  # the renderer draws the truth: no UNet
        return 0
    if cfg.method == "img2img":
        return min(round(cfg.strength * steps), steps) * passes * edits
    rows = steps * groups + steps * (groups + edits) * passes
    if cfg.inversion == "null-text" and cfg.guidance != 1:
        rows += steps * groups * (cfg.null_text_steps + 2)
    return rows


def unet_evaluations(cfg: PdgConfig, sources: int, samples_per_source: int | None = None) -> int:
    """UNet rows for `sources` source captions of `samples_per_source` (default pdg.num_samples)
    samples each, every group within one batch (an upper bound with null-text)."""
    k = cfg.num_samples if samples_per_source is None else samples_per_source
    return sources * batch_unet_evaluations(cfg, [k])


def plan_unet_evaluations(plan: GenerationPlan, cfg: PdgConfig, shards: Sequence[int] | None = None) -> int:
    """UNet rows of the plan's shards (all, or those indexed by `shards`), batched as `generate_shard` does."""
    all_shards = plan.shards(cfg.shard_size)
    chosen = range(len(all_shards)) if shards is None else shards
    return sum(
        batch_unet_evaluations(cfg, [len(group) for group in job_groups(batch)])
        for index in chosen
        for batch in shard_batches(all_shards[index], cfg)
    )


class MeteredEditor:
    """Wraps an edit function: times its calls and reads a `UnetCount`, so the UNet rows per second
    are known after the first batch (`on_first_batch(rows, seconds)` is called then)."""

    def __init__(self, edit: EditFunction, count: UnetCount,
                 on_first_batch: Callable[[int, float], None] = lambda rows, seconds: None):
        self.edit, self.count, self.on_first_batch = edit, count, on_first_batch
        self.seconds = 0.0
        self.batches = 0

    def __call__(self, jobs, sources):
        started = time.perf_counter()
        results = self.edit(jobs, sources)
        self.seconds += time.perf_counter() - started
        self.batches += 1
        if self.batches == 1:
            self.on_first_batch(self.count.rows, self.seconds)
        return results

    @property
    def rows_per_s(self) -> float:
        return self.count.rows / self.seconds if self.seconds else 0.0
