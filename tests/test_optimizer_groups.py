"""The optimizer's parameter groups: weights with decay apart from biases and norms without, and
train.head_lr for the new projection heads and the temperature (not for CLIP's pretrained
projections), every group on the same warm-up and cosine schedule."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.config import ModelConfig, TrainConfig
from pipeline.models import build_model
from pipeline.optimization import build_optimizer, lr_lambda
from tiny_models import CAPTIONS, TINY, save_tiny_clip


def _groups(optimizer):
    return [([id(p) for p in g["params"]], g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


def _tiny_model(**config):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, **config}), (32, 16), captions=CAPTIONS)
    return model


@pytest.mark.parametrize("head_lr", [0.0, 5e-4])
def test_without_a_separate_head_rate_two_groups_hold_decayed_weights_and_the_rest(head_lr):
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
