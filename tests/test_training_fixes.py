"""Training at real scale: gathering on the device, a finished run is done, the fingerprint's keys,
the heads' learning rate, mixed precision's auto choice."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.core.config import ModelConfig, TrainConfig, params_from_dict
from pipeline.data.canonical import list_shards
from pipeline.data.prepare import prepare
from pipeline.evaluation import RetrievalSplit, embed_retrieval_split
from pipeline.models import build_model
from pipeline.core.devices import training_precision as resolve_mixed_precision
from pipeline.optimization import build_optimizer, lr_lambda, make_accelerator
from pipeline.run_folder import RunFolder
from pipeline.training import Trainer, training_fingerprint
from test_models import CAPTIONS, TINY, save_tiny_clip
from test_training import TINY_TRAINING
from tiny_project import TINY_PROFILE, deep_merge

# --- evaluation under several processes: gathered on the device ---


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
        model, _ = build_model(ModelConfig(**TINY), (32, 16), captions=CAPTIONS)
        self.config, self.image_preprocessor, self.tokenizer = model.config, model.image_preprocessor, model.tokenizer
        self.scale = torch.nn.Parameter(torch.ones(TINY["embed_dim"]))

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


# --- a finished run is done; run-only keys keep the fingerprint ---


def _params(**train):
    return params_from_dict(deep_merge(deep_merge(TINY_PROFILE, TINY_TRAINING), {"train": train}))


def _trainer(prepared: Path, out_dir: Path, **train) -> Trainer:
    params = _params(**train)
    return Trainer(params, prepared, RunFolder(out_dir), make_accelerator(params, cpu=True))


def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _outputs(out_dir: Path) -> dict:
    files = [p for p in sorted(out_dir.rglob("*")) if p.is_file()]
    return {str(p.relative_to(out_dir)): _digest(p) for p in files}


class _Interrupted(Exception):
    pass


def _no_training(*args, **kwargs):
    raise AssertionError("a finished run trained again")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    prepare(_params(), root / "prepared")
    progress = _trainer(root / "prepared", root / "run").fit()
    return root, progress


def test_a_finished_run_is_done_not_trained_again(straight_run, tmp_path, monkeypatch):
    root, progress = straight_run
    assert progress.epoch == 2 and progress.global_step == 16
    before = _outputs(root / "run")
    assert {"best/model.safetensors", "last/model.safetensors", "state/progress.json"} <= set(before)
    last_weights = load_file(root / "run" / "last" / "model.safetensors")

    monkeypatch.setattr(Trainer, "_step", _no_training)
    monkeypatch.setattr(Trainer, "_validate", _no_training)
    again = _trainer(root / "prepared", root / "run").fit()
    assert again == progress
    assert _outputs(root / "run") == before  # not one file rewritten (contents and mtimes)

    # last/ gone (e.g. deleted by hand): written from the saved state, best/ left alone
    import shutil

    shutil.rmtree(root / "run" / "last")
    again = _trainer(root / "prepared", root / "run").fit()
    assert again == progress
    rewritten = load_file(root / "run" / "last" / "model.safetensors")
    assert rewritten.keys() == last_weights.keys()
    assert all(torch.equal(rewritten[k], last_weights[k]) for k in last_weights)
    after = _outputs(root / "run")
    assert {k: v for k, v in after.items() if not k.startswith("last/")} == {
        k: v for k, v in before.items() if not k.startswith("last/")
    }


def test_run_only_keys_leave_the_fingerprint_and_a_killed_run_resumes(straight_run, tmp_path, monkeypatch):
    root, straight = straight_run
    shards = list_shards(root / "prepared", "train")
    base = training_fingerprint(_params(), shards)
    assert training_fingerprint(_params(num_workers=3, eval_batch_size=5, checkpoint_every=7,
                                        launcher="torchrun --standalone --nproc_per_node 2"), shards) == base
    for changed in ({"batch_size": 4}, {"lr": 1e-3}, {"head_lr": 1e-3}, {"epochs": 3}, {"seed": 1}):
        assert training_fingerprint(_params(**changed), shards) != base, changed

    real_step = Trainer._step

    def step_until_killed(self, batch):
        if self.progress.global_step == 5:  # the state of step 4 is saved (checkpoint_every 2)
            raise _Interrupted
        return real_step(self, batch)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_step", step_until_killed)
        with pytest.raises(_Interrupted):
            _trainer(root / "prepared", tmp_path / "run").fit()

    resumed = _trainer(root / "prepared", tmp_path / "run", num_workers=1, eval_batch_size=4, checkpoint_every=3)
    assert resumed.resume_if_possible() and resumed.progress.global_step == 4  # resumed, not afresh
    progress = resumed.fit()
    assert [loss for _, loss in progress.losses] == [loss for _, loss in straight.losses]
    ours, theirs = load_file(tmp_path / "run/last/model.safetensors"), load_file(root / "run/last/model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# --- train.head_lr ---


def _groups(optimizer):
    return [([id(p) for p in g["params"]], g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


def _tiny_model(**config):
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(**{**TINY, **config}), (32, 16), captions=CAPTIONS)
    return model


@pytest.mark.parametrize("head_lr", [0.0, 5e-4])
def test_without_a_separate_head_rate_the_groups_are_as_before(head_lr):
    model = _tiny_model()
    cfg = TrainConfig(lr=5e-4, head_lr=head_lr, weight_decay=0.05)
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected = [
        ([id(p) for p in trainable if p.ndim >= 2], 5e-4, 0.05),
        ([id(p) for p in trainable if p.ndim < 2], 5e-4, 0.0),
    ]
    assert _groups(build_optimizer(model, cfg)) == expected


def test_head_lr_applies_to_new_projections_and_the_temperature():
    model = _tiny_model(learn_temperature=True)
    cfg = TrainConfig(lr=1e-4, head_lr=5e-4, weight_decay=0.05, warmup_fraction=0.5)
    optimizer = build_optimizer(model, cfg)
    heads = [model.image_projection.weight, model.image_projection.bias, model.text_projection.weight,
             model.text_projection.bias, model.log_temperature]
    head_ids = {id(p) for p in heads}
    towers = [p for p in model.parameters() if id(p) not in head_ids]
    ordered_heads = [p for p in model.parameters() if id(p) in head_ids]  # in the model's parameter order
    assert _groups(optimizer) == [
        ([id(p) for p in towers if p.ndim >= 2], 1e-4, 0.05),
        ([id(p) for p in towers if p.ndim < 2], 1e-4, 0.0),
        ([id(p) for p in ordered_heads if p.ndim >= 2], 5e-4, 0.05),
        ([id(p) for p in ordered_heads if p.ndim < 2], 5e-4, 0.0),
    ]
    assert {id(p) for p in optimizer.param_groups[3]["params"]} == {
        id(model.image_projection.bias), id(model.text_projection.bias), id(model.log_temperature)
    }
    assert len(optimizer.param_groups[2]["params"]) == 2
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(10, 5))
    seen = []
    for _ in range(8):
        optimizer.step()
        scheduler.step()
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs[2] == pytest.approx(5 * lrs[0]) and lrs[3] == pytest.approx(5 * lrs[1]) and lrs[0] == lrs[1]
        seen.append(lrs[0])
    assert len(set(seen)) >= 6 and max(seen) == pytest.approx(1e-4)  # warm-up, then the cosine: every group


def test_clip_keeps_its_projections_at_the_tower_rate(tmp_path):
    clip = save_tiny_clip(tmp_path / "clip")
    model = _tiny_model(preset="clip-vit-b16", vision_path=str(clip), text_path=str(clip), embed_dim=24,
                        max_text_length=64, learn_temperature=True)  # as the real profile trains it
    groups = _groups(build_optimizer(model, TrainConfig(lr=1e-5, head_lr=5e-5)))
    assert [(len(ids), lr) for ids, lr, _ in groups][2:] == [(1, 5e-5)]
    assert groups[2][0] == [id(model.log_temperature)]  # the only head: CLIP's projections are pretrained
    fixed = _tiny_model(learn_temperature=False)
    assert len(build_optimizer(fixed, TrainConfig(lr=1e-4, head_lr=5e-4)).param_groups) == 4  # projections' W and b


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


def test_the_fingerprint_sees_same_size_edits_not_the_thread_count(tmp_path, monkeypatch):
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"a red jacket" + bytes(100))
    base = training_fingerprint(_params(), [shard])
    shard.write_bytes(b"a tan jacket" + bytes(100))  # the same size: a caption edited in place
    edited = training_fingerprint(_params(), [shard])
    assert edited != base
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)  # how a run is executed: not its configuration
    assert training_fingerprint(_params(), [shard]) == edited
