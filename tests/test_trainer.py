"""The training loop: it learns and its stages write their outputs, a non-finite loss stops the run or
is skipped; across processes the data stream splits exactly, two processes follow one process's losses
and evaluation gathers on the device; mixed precision's auto choice."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.core.config import ModelConfig
from pipeline.core.devices import training_precision as resolve_mixed_precision
from pipeline.data.canonical import list_shards
from pipeline.data.loader import StreamPlan, build_shard_index, global_batches
from pipeline.data.prepare import prepare
from pipeline.evaluation import RetrievalSplit, embed_retrieval_split
from pipeline.models import DualEncoder, build_model
from pipeline.optimization import make_accelerator
from pipeline.run_folder import RunFolder
from pipeline.training import NonFiniteLossError, Trainer
from tiny_models import CAPTIONS, TINY
from tiny_project import dvc, run_train_stage, training_params, training_progress, training_project


# --- the loop and its stage ---


@pytest.mark.slow  # a stage in a subprocess or several processes: seconds, not milliseconds
def test_training_learns_and_the_stages_write_their_outputs(tmp_path):
    project = training_project(tmp_path, {"train": {"epochs": 8, "lr": 0.003}})
    dvc(project, "repro", "evaluate@baseline")
    history = training_progress(project)
    losses = [loss for _, loss in history["losses"]]
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.15  # the loss falls
    summary = json.loads((project / "metrics" / "train_baseline.json").read_text())
    assert summary["steps"] == 8 * 8 and 1 <= summary["best_epoch"] <= 8
    test = json.loads((project / "metrics" / "baseline.json").read_text())
    assert test["num_queries"] == 6 * 2 * 2 and test["num_gallery"] == 6 * 2
    assert test["R1"] <= test["R5"] <= test["R10"] and test["checkpoint_epoch"] == summary["best_epoch"]
    for png in ("reports/train/baseline/curves.png", "reports/evaluate/baseline/cmc.png",
                "reports/evaluate/baseline/retrievals.png"):
        assert (project / png).stat().st_size > 5000, png


class _NanAtStep:
    """The real loss, except NaN at one global step."""

    def __init__(self, criterion, trainer, step):
        self.criterion, self.trainer, self.step = criterion, trainer, step

    def __call__(self, *args, **kwargs):
        loss = self.criterion(*args, **kwargs)
        return loss * float("nan") if self.trainer.progress.global_step == self.step else loss


def _trainer(prepared, out_dir, **train):
    params = training_params(**train)
    trainer = Trainer(params, prepared, RunFolder(out_dir), make_accelerator(params, cpu=True))
    trainer.criterion = _NanAtStep(trainer.criterion, trainer, step=3)
    return trainer


def test_nonfinite_loss_stops_with_the_step_or_is_skipped(tmp_path):
    prepare(training_params(), tmp_path / "prepared")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 0 step 3 \(global step 3\)"):
        _trainer(tmp_path / "prepared", tmp_path / "strict").fit()

    progress = _trainer(tmp_path / "prepared", tmp_path / "lenient", nonfinite_loss="skip").fit()
    assert progress.skipped_batches == 1 and progress.global_step == 16
    assert len(progress.losses) == 15 and all(math.isfinite(loss) for _, loss in progress.losses)


# --- several processes: the data stream, the losses, evaluation gathered on the device ---


def test_data_stream_is_split_exactly_across_processes(tmp_path):
    params = training_params()
    prepare(params, tmp_path)
    index = build_shard_index(list_shards(tmp_path, "train"))
    whole = [[(p.key, p.caption) for p in batch] for _, batch in global_batches(StreamPlan(8, seed=1), index)]
    assert len(whole) == (16 * 2 * 2) // 8  # ids x images x captions / batch
    for rank in range(2):
        plan = StreamPlan(8, seed=1, rank=rank, world_size=2, start_step=3)
        for step, batch in global_batches(plan, index):
            assert [(p.key, p.caption) for p in batch] == whole[step]
    other_epoch = [[(p.key, p.caption) for p in b] for _, b in global_batches(StreamPlan(8, seed=1, epoch=1), index)]
    assert other_epoch != whole and sorted(sum(other_epoch, [])) == sorted(sum(whole, []))


@pytest.mark.slow  # a stage in a subprocess or several processes: seconds, not milliseconds
def test_two_processes_follow_the_one_process_loss_trajectory(tmp_path):
    one = training_project(tmp_path / "one")
    run_train_stage(one)
    two = training_project(tmp_path / "two")
    torchrun = (str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m")
    run_train_stage(two, launcher=torchrun)
    single = [loss for _, loss in training_progress(one)["losses"]]
    double = [loss for _, loss in training_progress(two)["losses"]]
    assert len(single) == len(double) == 16
    assert max(abs(a - b) for a, b in zip(single, double)) < 1e-4, (single, double)
    val_r1 = training_progress(one)["epochs"][-1]["val_R1"]
    assert training_progress(two)["epochs"][-1]["val_R1"] == pytest.approx(val_r1)


class _FakeAccelerator:
    """Rank 0 of 2 on a device that is not the CPU ("meta": shapes without data, so any move to the
    CPU before the gather fails); gather records what it is handed and returns rank-major rows (on
    the CPU: a meta tensor has no data to copy back, so they stand in for the gathered device rows)."""

    process_index, num_processes = 0, 2

    def __init__(self, device: torch.device, dim: int):
        self.device, self.dim, self.received = device, dim, []

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.received.append((tensor.device, tuple(tensor.shape)))
        rows = tensor.shape[0] * self.num_processes
        return torch.arange(rows * self.dim, dtype=torch.float32).view(rows, self.dim)


def _retrieval_split(count: int) -> RetrievalSplit:
    images = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 32), (10 * i, 0, 0)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(count)]
    return RetrievalSplit([f"k{i}" for i in range(count)], images, torch.arange(count), captions, torch.arange(count),
                          list(range(count)))


class _DeviceEncoder(torch.nn.Module):
    """The tiny model's preprocessing and tokenizer, and embeddings computed where the inputs are
    (transformers' masks call .item(), which a meta tensor cannot answer)."""

    def __init__(self):
        super().__init__()
        model = build_model(ModelConfig(**TINY), (32, 16), captions=CAPTIONS)
        self.config, self.image_preprocessor, self.tokenizer = model.config, model.image_preprocessor, model.tokenizer
        self.scale = torch.nn.Parameter(torch.ones(TINY["embed_dim"]))

    embed_texts, embed_images = DualEncoder.embed_texts, DualEncoder.embed_images  # the real batching
    device = torch.device("meta")  # where the model's inputs go

    def encode_image(self, pixel_values):
        assert pixel_values.device.type == "meta"
        return pixel_values.flatten(1)[:, : TINY["embed_dim"]] * self.scale.to(pixel_values.device)

    def encode_text(self, input_ids, attention_mask):
        assert input_ids.device.type == attention_mask.device.type == "meta"
        return input_ids.float()[:, : TINY["embed_dim"]] * self.scale.to(input_ids.device)


def test_evaluation_gathers_device_tensors_and_returns_cpu_ones():
    model = _DeviceEncoder()
    device = torch.device("meta")
    accelerator = _FakeAccelerator(device, TINY["embed_dim"])
    data = _retrieval_split(5)  # 5 items over 2 ranks: 3 each, rank 0 takes 0, 2, 4
    text_emb, image_emb = embed_retrieval_split(model, data, batch_size=2, device=device, accelerator=accelerator)
    assert accelerator.received == [(device, (3, TINY["embed_dim"]))] * 2  # texts, then images
    assert all(d == accelerator.device for d, _ in accelerator.received)
    for emb in (text_emb, image_emb):
        assert emb.device.type == "cpu" and emb.dtype == torch.float32 and emb.shape == (5, TINY["embed_dim"])
        # rank-major rows [r0: 0 2 4 | r1: 1 3 (pad)] put back in item order
        assert emb[:, 0].tolist() == [row * TINY["embed_dim"] for row in (0, 3, 1, 4, 2)]


# --- train.mixed_precision: auto ---


@pytest.mark.parametrize(
    "cuda, bf16, expected", [(True, True, "bf16"), (True, False, "fp16"), (False, False, "no")]
)
def test_auto_mixed_precision_picks_bf16_then_fp16_on_a_gpu(monkeypatch, cuda, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_mixed_precision("auto") == expected
    assert resolve_mixed_precision("auto", cpu=True) == "no"
    for explicit in ("no", "bf16", "fp16"):
        assert resolve_mixed_precision(explicit) == explicit
