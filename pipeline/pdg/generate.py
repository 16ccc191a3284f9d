"""Offline proximity data generation: training pairs in, edited pairs out as WebDataset shards.

The work is planned up front as an ordered list of jobs (source image, caption edit, seed). The list
is cut into shards of `pdg.shard_size` jobs. A shard's content depends only on its jobs. This gives
three properties.
- Resuming keeps every finished shard. Shards are written under a temporary name, then renamed.
- N processes take shards i with i % N == rank, and their union equals a 1-process run.
- A fingerprint (pipeline/run_folder.py) detects a changed configuration (params or generator
  weights). The run then starts over instead of mixing old and new samples. Params that change no
  sample, such as the batch size and the sample sheet, are not part of the fingerprint. So changing
  them keeps finished shards.

A shard's p2p jobs are edited in batches of at most `pdg.batch_size`, cut at group boundaries. A group
is the K samples of one source caption. So each group is inverted once (`edit_batches`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from pipeline.core.config import PdgConfig
from pipeline.data.canonical import ImageRecord, write_tar_atomic
from pipeline.imports import code_digest
from pipeline.core.io import files_digest
from pipeline.pdg.shards import SHARD_NAME
from pipeline.text import find_color_phrases
from pipeline.text.caption_edit import CaptionEdit, edit_captions

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class GenerationJob:
    key: str  # the sample's key in the shards
    source: ImageRecord
    caption_index: int
    edit: CaptionEdit
    seed: int


@dataclass(frozen=True)
class GenerationPlan:
    jobs: list[GenerationJob]
    sources: int  # training images drawn as sources
    sources_without_edit: int  # of those, images none of whose captions has an editable colour phrase
    edits_not_alignable: int = 0  # edits dropped: the prompt tokens could not be aligned (e.g. past the limit)
    edits_not_renderable: int = 0  # oracle only: edits dropped whose true image the renderer cannot draw

    def shards(self, shard_size: int) -> list[list[GenerationJob]]:
        return [self.jobs[i : i + shard_size] for i in range(0, len(self.jobs), shard_size)]


def select_sources(train_rows: list[ImageRecord], cfg: PdgConfig) -> list[ImageRecord]:
    """A seeded subset of the training images (never val or test: they must stay unseen)."""
    foreign = sorted({row.split for row in train_rows} - {"train"})
    if foreign:
        raise ValueError(f"PDG sources must come from the train split only, got rows of {foreign}")
    count = cfg.source_count or round(cfg.source_fraction * len(train_rows))
    picked = np.random.default_rng([cfg.seed, 0]).permutation(len(train_rows))[: min(count, len(train_rows))]
    return [train_rows[i] for i in sorted(picked)]


def _editable_caption(row: ImageRecord, cfg: PdgConfig, rng: np.random.Generator) -> int | None:
    """A caption of the image (in seeded order) with at least one editable colour phrase."""
    for index in rng.permutation(len(row.captions)):
        if find_color_phrases(row.captions[index], cfg.allow_hair):
            return int(index)
    return None


def plan_generation(
    train_rows: list[ImageRecord], cfg: PdgConfig, alignable: Callable[[CaptionEdit], bool] = lambda edit: True
) -> GenerationPlan:
    """Jobs in a fixed order; `alignable` drops edits the generator's tokenizer cannot align (counted)."""
    sources = select_sources(train_rows, cfg)
    chosen: list[tuple[ImageRecord, int]] = []
    for position, row in enumerate(sources):
        index = _editable_caption(row, cfg, np.random.default_rng([cfg.seed, 1, position]))
        if index is not None:
            chosen.append((row, index))
    edits = edit_captions([row.captions[i] for row, i in chosen], cfg.num_samples, cfg.seed, allow_hair=cfg.allow_hair)
    jobs = [
        GenerationJob(f"pdg-{row.key}-{k}", row, index, edit, _sample_seed(cfg.seed, row.key, k))
        for (row, index), row_edits in zip(chosen, edits)
        for k, edit in enumerate(row_edits)
    ]
    kept = [job for job in jobs if alignable(job.edit)]
    return GenerationPlan(kept, len(sources), len(sources) - len(chosen), len(jobs) - len(kept))


def alignable_with(tokenizer) -> Callable[[CaptionEdit], bool]:
    """Whether Prompt-to-Prompt can align an edit's prompts under `tokenizer`."""
    from pipeline.editing.alignment import align_word_swap

    def check(edit: CaptionEdit) -> bool:
        spans = [(change.source_span, change.edited_span) for change in edit.changes]
        try:
            align_word_swap(tokenizer, edit.source, edit.edited, spans)
        except ValueError:
            return False
        return True

    return check


def _sample_seed(seed: int, key: str, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}/{key}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# params that change no sample: how many edits share the UNet (a batch changes float rounding at
# most, not the samples' meaning), how many the sample sheet shows, and what launches the processes
# (how a run is executed is never part of it). Precision does change them.
_NOT_SHAPING = ("batch_size", "sheet_samples", "launcher")


def shaping_params(cfg: PdgConfig) -> dict:
    """The pdg params a sample depends on: recorded in each sample and in the fingerprint."""
    shaping = dataclasses.asdict(cfg)
    for bookkeeping in _NOT_SHAPING:
        shaping.pop(bookkeeping)
    return shaping


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def generation_fingerprint(cfg: PdgConfig, generator_dir: str, data_files: Sequence[str | Path]) -> dict:
    """What the samples depend on, so that shards made by other code or from other sources are not kept.

    That is the params that shape the samples, the generator's weights, the contents of the source data
    and the code `stages.generate` runs. `data_files` are the train manifest and shards."""
    return {"pdg": shaping_params(cfg), "generator": generator_dir, "generator_weights": weights_digest(generator_dir),
            "data": files_digest(data_files),
            "code": code_digest("stages.generate")}


def weights_digest(generator_dir: str) -> str:
    """sha256 over a local model folder's weight files and JSON configs. A hub id stands for itself.

    The hash covers the relative path and content sha256 of each file. It hashes contents, not stats.
    A checkpoint copied without its mtimes (plain cp, some checkouts) is the same generator, so it
    keeps the finished shards of days of generation. Each file is read once, through the project's
    digest cache (pipeline/core/io.py). Later starts on every rank only stat it.
    """
    from pipeline.core.io import tree_digest

    if not Path(generator_dir).is_dir():
        return generator_dir
    return tree_digest(generator_dir, keep=lambda name: name.endswith((*WEIGHT_SUFFIXES, ".json")))[0]


EditFunction = Callable[[list[GenerationJob], list[Image.Image]], list]


def _sample(job: GenerationJob, result, cfg: PdgConfig, generator_dir: str) -> dict[str, bytes]:
    record = {
        "key": job.key,
        "source_key": job.source.key,
        "source_person_id": job.source.person_id,
        "source_original_id": job.source.original_id,
        "source_caption_index": job.caption_index,
        "source_caption": job.edit.source,
        "edited_caption": job.edit.edited,
        "changes": [change.to_json() for change in job.edit.changes],
        "method": cfg.method,
        "params": shaping_params(cfg),
        "generator": generator_dir,
        "seed": job.seed,
    }
    sample = {"__key__": job.key, "png": _png(result.image), "json": json.dumps(record, sort_keys=True).encode()}
    if result.mask is not None:
        sample["mask.png"] = _png(result.mask)
    return sample


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def edit_batches(jobs: list[GenerationJob], batch_size: int) -> list[list[GenerationJob]]:
    """A shard's jobs cut into batches of at most `batch_size`, at group boundaries.

    The consecutive jobs of one (source, caption) stay together, so their source is inverted once.
    A group larger than `batch_size` is cut into pieces of `batch_size`, each inverted on its own."""
    batches: list[list[GenerationJob]] = []
    current: list[GenerationJob] = []
    for group in job_groups(jobs):
        if current and len(current) + len(group) > batch_size:
            batches.append(current)
            current = []
        while len(group) > batch_size:
            batches.append(group[:batch_size])
            group = group[batch_size:]
        current += group
        if len(current) == batch_size:
            batches.append(current)
            current = []
    return batches + ([current] if current else [])


def shard_batches(jobs: list[GenerationJob], cfg: PdgConfig) -> list[list[GenerationJob]]:
    """The edit batches of a shard: p2p's cut at group boundaries (`edit_batches`); img2img, which
    shares nothing between a group's jobs, in plain slices of `pdg.batch_size`."""
    if cfg.method == "p2p":
        return edit_batches(jobs, cfg.batch_size)
    return [jobs[i : i + cfg.batch_size] for i in range(0, len(jobs), cfg.batch_size)]


def job_groups(jobs: Iterable[GenerationJob]) -> list[list[GenerationJob]]:
    groups: list[list[GenerationJob]] = []
    for job in jobs:
        if groups and (groups[-1][0].source.key, groups[-1][0].caption_index) == (job.source.key, job.caption_index):
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


def generate_shard(
    jobs: list[GenerationJob], images: dict[str, bytes], edit: EditFunction, cfg: PdgConfig, generator_dir: str
) -> Iterator[dict[str, bytes]]:
    """Samples of one shard, edited in `shard_batches` (fixed per shard, so reproducible)."""
    for batch in shard_batches(jobs, cfg):
        decoded: dict[str, Image.Image] = {}
        for job in batch:  # one image object per source: the edits of a group share it
            if job.source.key not in decoded:
                decoded[job.source.key] = Image.open(io.BytesIO(images[job.source.key])).convert("RGB")
        for job, result in zip(batch, edit(batch, [decoded[job.source.key] for job in batch])):
            yield _sample(job, result, cfg, generator_dir)


@dataclass(frozen=True)
class GenerationReport:
    shards_written: int
    shards_reused: int  # finished by an earlier run of the same fingerprint
    samples_written: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples_written / self.seconds if self.seconds else 0.0


def run_generation(
    plan: GenerationPlan,
    images: dict[str, bytes],
    edit: EditFunction,
    cfg: PdgConfig,
    generator_dir: str,
    out_dir: Path,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int], None] = lambda samples: None,
) -> GenerationReport:
    """Write this process's shards (i % world_size == rank) that are not already complete."""
    written = reused = samples = 0
    start = time.perf_counter()
    for index, jobs in enumerate(plan.shards(cfg.shard_size)):
        if index % world_size != rank:
            continue
        path = out_dir / (SHARD_NAME % index)
        if path.is_file():
            reused += 1
            progress(len(jobs))
            continue
        count = write_tar_atomic(path, _counted(generate_shard(jobs, images, edit, cfg, generator_dir), progress))
        written, samples = written + 1, samples + count
    return GenerationReport(written, reused, samples, time.perf_counter() - start)


def shard_names(plan: GenerationPlan, cfg: PdgConfig) -> list[str]:
    """The file names of every shard the plan makes, over all processes."""
    return [SHARD_NAME % index for index in range(len(plan.shards(cfg.shard_size)))]


def wait_for_shards(
    out_dir: Path, expected_paths: Iterable[str | Path], poll_s: float = 10.0, timeout_s: float | None = None,
    log_every_s: float = 300.0,
) -> None:
    """Blocks until every expected shard exists, polling the file system every `poll_s` seconds.

    Paths are relative to `out_dir`, or absolute. This is the main process's end-of-run wait for the
    other processes. It uses no collective, because NCCL's barrier would time out after 30 minutes
    when ranks' remaining work differs by hours. Raises TimeoutError after `timeout_s`. With None it
    never does."""
    expected = [Path(out_dir) / path for path in expected_paths]
    started = time.monotonic()
    last_log = None
    while True:
        missing = [path for path in expected if not path.is_file()]
        if not missing:
            return
        now = time.monotonic()
        if timeout_s is not None and now - started >= timeout_s:
            raise TimeoutError(f"{len(missing)} of {len(expected)} shards still missing after {timeout_s:.0f} s, "
                               f"e.g. {missing[0]}")
        if last_log is None or now - last_log >= log_every_s:
            log.info("waiting for %d of %d shards from the other processes, e.g. %s", len(missing), len(expected),
                     missing[0].name)
            last_log = now
        time.sleep(poll_s)


def _counted(samples: Iterator[dict], progress: Callable[[int], None]) -> Iterator[dict]:
    for sample in samples:
        progress(1)
        yield sample


def make_editor(parts, cfg: PdgConfig) -> EditFunction:
    """Bind the configured method and its settings (`EditSettings.from_config`) to a loaded generator."""
    from pipeline.editing.edit import EditRequest, edit_img2img_batch, edit_p2p_batch
    from pipeline.editing.settings import EditSettings

    settings = EditSettings.from_config(cfg)

    def prompt_to_prompt(jobs: list[GenerationJob], sources: list[Image.Image]) -> list:
        requests = [
            EditRequest(image, job.edit.source, job.edit.edited, [(c.source_span, c.edited_span) for c in job.edit.changes])
            for job, image in zip(jobs, sources)
        ]
        return edit_p2p_batch(parts, requests, settings)

    def sdedit(jobs: list[GenerationJob], sources: list[Image.Image]) -> list:
        return edit_img2img_batch(parts, sources, [job.edit.edited for job in jobs], settings,
                                  seed=[job.seed for job in jobs])

    return {"p2p": prompt_to_prompt, "img2img": sdedit}[cfg.method]
