"""The contrastive training loop of the dual encoder, on Accelerate.

- One process on a CPU or N processes on GPUs run the same code; `train.launcher` starts them. The
  main process digests the data, indexes the shards and decides whether to resume. The others are
  told (pipeline/core/distributed.py).
- Every `checkpoint_every` steps the full state is saved: weights, optimiser, schedule, RNGs and the
  progress record. pipeline/checkpointing.py writes it as safetensors and JSON, so nothing is
  unpickled on resume, and it is swapped in as a whole folder (pipeline/core/io.py).
- A restarted run resumes from the newest state. The data stream is a pure function of (seed, epoch,
  step), so it continues exactly where it stopped. A finished run of the same fingerprint trains nothing.
- After each epoch the model is scored on the validation split. The best-on-val and the last model
  are saved with `save_pretrained`.
- Nothing measured on the clock goes under models/, so two runs of one configuration write
  byte-identical outputs. Timings (pairs/s, the data wait share) go to `timing_file`
  (reports/train/<variant>/timing.json).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from pipeline.checkpointing import (Progress, StateError, apply_training_state, load_model_weights, read_progress,
                                    read_training_state, save_training_state)
from pipeline.core.config import ConfigError, FieldError, OnlineConfig, Params, VariantConfig
from pipeline.data.augment import AugmentConfig
from pipeline.data.canonical import list_shards, manifest_path, read_manifest
from pipeline.data.loader import ContrastivePairs, ShardIndex, StreamPlan, build_shard_index, pair_loader
from pipeline.core.distributed import check_shared_folder, on_main
from pipeline.evaluation import evaluate_retrieval, load_retrieval_split
from pipeline.imports import code_digest
from pipeline.core.io import files_digest, write_json_atomic
from pipeline.losses import HardnessAwareContrastiveLoss, mixed_pair_targets
from pipeline.models import DualEncoder, build_model, minilm_path
from pipeline.models.mixup import FeatureMix
from pipeline.models.tokenization import tokenize
from pipeline.optimization import build_optimizer, warmup_cosine_schedule
from pipeline.run_folder import RunFolder, fingerprint
from pipeline.text.approximate import ApproximateText, build_approximate_text

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (train.nonfinite_loss: stop)."""


# train.* keys that say how a run is executed, not what it learns. They are left out of the fingerprint,
# so a run resumes (or counts as done) after they change.
# - num_workers: loader workers only decode batches, a pure function of (seed, epoch, step).
# - eval_batch_size: it only batches the validation embeddings.
# - checkpoint_every: how often the state is saved; the saved state is the run's own whenever it was taken.
# - launcher: how many processes share each global batch.
RUN_ONLY_TRAIN_KEYS = ("num_workers", "eval_batch_size", "checkpoint_every", "launcher")


def training_fingerprint(params: Params, data_files: list[str | Path], variant: VariantConfig | None = None) -> str:
    """Identifies the run a saved state belongs to: a state of another run is never resumed.

    It covers what defines the run: the params (but not RUN_ONLY_TRAIN_KEYS), the contents of the
    data files (train shards, their manifest, the val shards: an edited caption keeps a tar's size,
    not its hash) and the code `stages.train` runs (pipeline.imports.code_digest). Never how it was
    executed: threads, process count, launcher, workers and batch split change the floating-point
    order of the sums, not the configuration, so a run finished by `torchrun` with one thread a
    process is done for a `dvc repro` with all of the machine's threads.
    """
    relevant = {k: dataclasses.asdict(getattr(params, k)) for k in ("model", "loss", "train")}
    for key in RUN_ONLY_TRAIN_KEYS:
        del relevant["train"][key]
    relevant["variant"] = dataclasses.asdict(variant or VariantConfig())
    relevant["image_size"] = [params.data.image_height, params.data.image_width]
    relevant["data"] = files_digest(data_files)
    relevant["code"] = code_digest("stages.train")
    return fingerprint(relevant)


def _check_mixup_layer(online: OnlineConfig, model: DualEncoder) -> None:
    if online.mixup_prob <= 0:
        return
    depth = min(len(model.image_tower.layers), len(model.text_tower.layers))
    if online.mixup_layer >= depth:
        raise FieldError("online.mixup_layer", f"{online.mixup_layer} must be below {depth}, the number of "
                         "layers of the shallower tower")


def _approximate_text(online: OnlineConfig, captions) -> ApproximateText | None:
    if online.text_prob <= 0:
        return None
    embedding_dir = minilm_path() if online.embedding_neighbours else None
    return build_approximate_text(online.text_prob, online.text_fraction, tuple(online.text_weights), captions,
                                  embedding_dir)


def steps_per_epoch(num_pairs: int, batch_size: int) -> int:
    """Optimiser steps in one epoch over `num_pairs` pairs (one step per full global batch)."""
    steps = num_pairs // batch_size
    if steps == 0:
        raise ConfigError(f"params: 'train.batch_size' {batch_size} exceeds the {num_pairs} training pairs")
    return steps


class Trainer:
    """Trains on the train shards of `variant.data` (default: `prepared_dir`), validates on the val
    split of `prepared_dir`, and applies the variant's online PDG."""

    def __init__(
        self, params: Params, prepared_dir: str | Path, outputs: RunFolder, accelerator: Accelerator,
        variant: VariantConfig | None = None, timing_file: str | Path | None = None,
    ):
        self.params = params
        self.timing_file = Path(timing_file) if timing_file else None
        self.timing: list[dict] = []  # per epoch: pairs_per_s, data_wait_share (never under models/)
        self.cfg = params.train
        self.variant = variant or VariantConfig(data=str(prepared_dir))
        self.online = self.variant.online
        self.outputs = outputs
        self.accelerator = accelerator
        check_shared_folder(accelerator, outputs.root)
        train_dir = Path(self.variant.data)
        self.shards = list_shards(train_dir, "train")
        if not self.shards:
            raise FileNotFoundError(f"no train shards under {train_dir / 'shards'}")
        train_rows = read_manifest(manifest_path(train_dir, "train"))
        self.index: ShardIndex = on_main(accelerator, lambda: build_shard_index(self.shards))
        self.steps_per_epoch = steps_per_epoch(self.index.num_pairs, self.cfg.batch_size)
        self.total_steps = self.steps_per_epoch * self.cfg.epochs
        set_seed(self.cfg.seed)
        model = build_model(
            params.model, (params.data.image_height, params.data.image_width),
            captions=(c for row in train_rows for c in row.captions),
        )
        optimizer = build_optimizer(model, self.cfg)
        scheduler = warmup_cosine_schedule(optimizer, self.total_steps, self.cfg.warmup_fraction)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        # Not prepared: Accelerate would step it once per process, but our batch is global.
        self.scheduler = scheduler
        self.criterion = HardnessAwareContrastiveLoss.from_config(params.loss)
        self.val_data = load_retrieval_split(prepared_dir, "val")
        data_files = [*self.shards, manifest_path(train_dir, "train"), *list_shards(prepared_dir, "val")]
        fingerprint = on_main(accelerator, lambda: training_fingerprint(params, data_files, self.variant))
        self.progress = Progress(fingerprint=fingerprint)
        self._main_state = None  # the state the main process read while deciding to resume
        self.approximate_text = _approximate_text(self.online, (c for row in train_rows for c in row.captions))
        _check_mixup_layer(self.online, model)

    @property
    def unwrapped(self) -> DualEncoder:
        return self.accelerator.unwrap_model(self.model)

    # -- state -------------------------------------------------------------------------------

    def resume_if_possible(self) -> bool:
        """Continue the saved state of this run (same fingerprint), or clear the outputs; True when
        resumed. A finished run of the same fingerprint is resumed too, at its end: it is done. The
        main process decides (`_decide`) and every process follows."""
        decision, saved = on_main(self.accelerator, self._decide)
        if decision == "afresh":
            return False
        self.progress = Progress(**saved)
        if decision == "finished":
            log.info("%s holds this run, finished (%d epochs, %d steps): nothing to train", self.outputs.state_dir,
                     self.progress.epoch, self.progress.global_step)
            return True
        # the main process read (and checked) the whole state in _decide; the others read theirs now
        state = self._main_state or read_training_state(self.outputs.state_dir, self.accelerator)
        apply_training_state(state, self.accelerator, self.model, self.optimizer, self.scheduler)
        self._main_state = None
        log.info("resumed at epoch %d step %d (global step %d)", self.progress.epoch, self.progress.step_in_epoch,
                 self.progress.global_step)
        return True

    def _decide(self) -> tuple[str, dict | None]:
        """On the main process: "finished", "resume" (with the saved progress) or "afresh" (state/
        cleared). A state that cannot be read (a file missing or broken: named in a warning) is
        started afresh; so is a finished run whose best model is gone."""
        state = self.outputs.state_dir
        self.outputs.recover()
        try:
            saved = read_progress(state, Progress)
        except StateError as err:
            log.warning("%s: starting afresh", err)
            saved = None
        if saved is None or saved.fingerprint != self.progress.fingerprint:
            if saved is not None:
                log.info("saved state in %s is from another configuration: starting afresh", state)
            self.outputs.clear_state()
            return "afresh", None
        if saved.epoch >= self.cfg.epochs:
            if not self.outputs.holds(self.outputs.best, saved.fingerprint, saved.best_epoch) \
                    and saved.best_epoch != saved.epoch:
                log.info("saved state in %s is a finished run, but its best model (epoch %d) is gone: "
                         "starting afresh", state, saved.best_epoch)
                self.outputs.clear_state()
                return "afresh", None
            return "finished", dataclasses.asdict(saved)
        try:
            self._main_state = read_training_state(state, self.accelerator)
        except StateError as err:
            log.warning("%s: starting afresh", err)
            self.outputs.clear_state()
            return "afresh", None
        return "resume", dataclasses.asdict(saved)

    @property
    def finished(self) -> bool:
        return self.progress.epoch >= self.cfg.epochs

    def save_state(self) -> None:
        """The whole state, written by every process into one staging folder swapped in whole."""
        self.outputs.save_state(self.accelerator, lambda staging: save_training_state(
            staging, self.accelerator, self.model, self.optimizer, self.scheduler, dataclasses.asdict(self.progress)))

    # -- loop --------------------------------------------------------------------------------

    def _plan(self, epoch: int, start_step: int) -> StreamPlan:
        augment = AugmentConfig(flip_prob=self.cfg.flip_prob, crop_padding=self.cfg.crop_padding, erase_prob=self.cfg.erase_prob)
        return StreamPlan(
            global_batch_size=self.cfg.batch_size,
            seed=self.cfg.seed,
            epoch=epoch,
            start_step=start_step,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            augment=augment,
        )

    def _loader(self, epoch: int, start_step: int):
        model = self.unwrapped
        max_length = model.config.max_text_length

        def tokenize_captions(captions):
            return tokenize(model.tokenizer, captions, max_length)

        dataset = ContrastivePairs(self._plan(epoch, start_step), self.index, model.image_preprocessor,
                                   tokenize_captions, self.approximate_text)
        return pair_loader(dataset, self.cfg.num_workers, pin_memory=self.accelerator.device.type == "cuda")

    def _feature_mix(self, batch_size: int) -> FeatureMix | None:
        """This batch's mixup (or None): lam_i ~ Beta(alpha, alpha) per pair and a random partner,
        drawn from (seed, global step, rank) so that a resumed run mixes as an uninterrupted one."""
        if self.online.mixup_prob <= 0:
            return None
        # Every rank takes the same decision: the mixed targets are gathered collectively.
        if np.random.default_rng((self.cfg.seed, self.progress.global_step)).random() >= self.online.mixup_prob:
            return None
        rng = np.random.default_rng((self.cfg.seed, self.progress.global_step, self.accelerator.process_index))
        lam = torch.from_numpy(rng.beta(self.online.mixup_alpha, self.online.mixup_alpha, batch_size)).float()
        permutation = torch.from_numpy(rng.permutation(batch_size))
        device = self.accelerator.device
        return FeatureMix(self.online.mixup_layer, permutation.to(device), lam.to(device))

    def _step(self, batch: dict) -> float | None:
        device = self.accelerator.device
        person_ids = batch["person_ids"].to(device)
        mix = self._feature_mix(len(person_ids))
        with self.accelerator.autocast():
            image_emb, text_emb = self.model(
                batch["pixel_values"].to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device),
                mix=mix,
            )
        targets = None
        if mix is not None:
            targets = mixed_pair_targets(person_ids, mix.permutation, mix.lam, self.params.loss.identity_positives)
        loss = self.criterion(image_emb, text_emb, person_ids, self.unwrapped.temperature(), targets)
        if not torch.isfinite(self.accelerator.reduce(loss.detach(), "sum")):
            return self._nonfinite(batch["step"])
        self.accelerator.backward(loss)
        if self.cfg.grad_clip > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.accelerator.reduce(loss.detach(), "mean").item()

    def _nonfinite(self, step: int) -> None:
        where = f"epoch {self.progress.epoch} step {step} (global step {self.progress.global_step})"
        if self.cfg.nonfinite_loss == "stop":
            raise NonFiniteLossError(f"non-finite loss at {where}; set train.nonfinite_loss: skip to skip such batches")
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.skipped_batches += 1
        log.warning("skipped a batch with a non-finite loss at %s", where)
        return None

    def _run_epoch(self, epoch: int) -> dict:
        progress = self.progress
        waited = stepped = 0.0
        pairs = 0
        bar = tqdm(
            total=self.steps_per_epoch, initial=progress.step_in_epoch, desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            unit="step", disable=not self.accelerator.is_main_process, dynamic_ncols=True,
        )
        # The loader draws its base seed from a fork of the global generator: a resumed run's generator
        # then follows an uninterrupted run's (the stream itself is a function of seed, epoch and step).
        with torch.random.fork_rng(devices=[]):
            batches = iter(self._loader(epoch, progress.step_in_epoch))
        clock = time.perf_counter()
        for batch in batches:
            ready = time.perf_counter()
            loss = self._step(batch)
            done = time.perf_counter()
            waited, stepped, clock = waited + ready - clock, stepped + done - ready, done
            pairs += self.cfg.batch_size
            progress.step_in_epoch = batch["step"] + 1
            progress.global_step += 1
            if loss is not None:
                progress.losses.append([progress.global_step, loss])
                bar.set_postfix(loss=f"{loss:.3f}", pairs_s=f"{pairs / (waited + stepped):.0f}")
            bar.update(1)
            if progress.global_step % self.cfg.checkpoint_every == 0:
                self.save_state()
        bar.close()
        total = waited + stepped
        return {"pairs_per_s": pairs / total if total else 0.0, "data_wait_share": waited / total if total else 0.0}

    def _validate(self, epoch: int, timing: dict) -> None:
        metrics, _ = evaluate_retrieval(
            self.unwrapped, self.val_data, self.cfg.eval_batch_size, self.accelerator.device, self.accelerator
        )
        epoch_losses = [loss for step, loss in self.progress.losses if step > epoch * self.steps_per_epoch]
        record = {
            "epoch": epoch + 1,
            "train_loss": sum(epoch_losses) / len(epoch_losses) if epoch_losses else float("nan"),
            "val_R1": metrics["R1"],
            "val_mAP": metrics["mAP"],
            "temperature": self.unwrapped.temperature().item(),
        }
        self.progress.epochs.append(record)
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in {**record, **timing}.items()})
        score = metrics["R1"] + metrics["mAP"]  # ties in R1 are common on small val sets
        if score > self.progress.best_score:
            self.progress.best_score, self.progress.best_epoch = score, epoch + 1
            self._save_model(self.outputs.best, epoch + 1)

    def _save_model(self, directory: Path, epoch: int) -> None:
        def write(staging: Path) -> None:
            model = self.unwrapped  # its tokenizer saves the padding of its last call: make it this one's
            tokenize(model.tokenizer, [""], model.config.max_text_length)
            model.save_pretrained(staging)

        self.outputs.save_model(self.accelerator, directory, write, self.progress.fingerprint, epoch)

    def _record_timing(self, record: dict | None = None) -> None:
        """Add an epoch's timing (or none) and write the file: a finished run that `dvc repro` reruns
        (its timing file removed first, as every output DVC reruns) declares the timings it still has."""
        if record is not None:
            self.timing = [t for t in self.timing if t["epoch"] < record["epoch"]] + [record]
        if self.timing_file is not None and self.accelerator.is_main_process:
            write_json_atomic(self.timing_file, self.timing)

    def _read_timing(self) -> None:
        """The timings of this run's epochs done before a restart (a report: unreadable means none)."""
        try:
            records = json.loads(self.timing_file.read_text()) if self.timing_file else []
            self.timing = [r for r in records if r["epoch"] <= self.progress.epoch]
        except (OSError, ValueError, TypeError, KeyError) as err:
            log.info("%s: no earlier timings (%s)", self.timing_file, err)

    def fit(self) -> Progress:
        """Train to the end (resuming this run's saved state) and return its progress; a finished run
        is not trained again: its best/ and last/ stay, a missing one (or one of another run) written
        from the state."""
        if self.resume_if_possible():
            self._read_timing()
        if self.finished:
            self._record_timing()
            run = self.progress.fingerprint
            missing = [(d, epoch) for d, epoch in ((self.outputs.best, self.progress.best_epoch),
                                                   (self.outputs.last, self.progress.epoch))
                       if not self.outputs.holds(d, run, epoch)]
            if missing:  # best/ only when the last epoch was the best (_decide)
                load_model_weights(self.outputs.state_dir, self.accelerator, self.model)
                for directory, epoch in missing:
                    log.info("writing %s from the saved state", directory)
                    self._save_model(directory, epoch)
            return self.progress
        while self.progress.epoch < self.cfg.epochs:
            epoch = self.progress.epoch
            timing = self._run_epoch(epoch)
            self._record_timing({"epoch": epoch + 1, **timing})
            self._validate(epoch, timing)
            self.progress.epoch, self.progress.step_in_epoch = epoch + 1, 0
            self.save_state()
        if not self.outputs.holds(self.outputs.last, self.progress.fingerprint, self.progress.epoch):
            self._save_model(self.outputs.last, self.progress.epoch)
        return self.progress
