"""Online PDG: approximate text generation and feature-level mixup with mixed contrastive targets."""

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.core.config import ConfigError, FieldError, params_from_dict
from pipeline.data.prepare import prepare
from pipeline.losses import HardnessAwareContrastiveLoss, mixed_pair_targets
from pipeline.models import minilm_path
from pipeline.text.approximate import (
    PROTECTED,
    ApproximateText,
    build_approximate_text,
    embedding_neighbours,
    lexicon_neighbours,
)
from pipeline.text.lexicon import COLOR_FAMILY, GARMENT_NOUNS
from pipeline.optimization import make_accelerator
from pipeline.run_folder import RunFolder
from pipeline.training import Trainer
from tiny_project import TINY_PROFILE, TINY_TRAINING, deep_merge

CAPTION = "A young man walking toward the camera, wearing a dark blue striped shirt, gray pants and white shoes. He is carrying a black backpack."


def _colour_and_garment_words(text):
    words = [w.strip(".,").lower() for w in text.split()]
    return [w for w in words if w in COLOR_FAMILY or w in GARMENT_NOUNS or w in PROTECTED]


@pytest.fixture(scope="module")
def minilm_perturber():
    return build_approximate_text(1.0, 0.3, (1.0, 0.0, 0.0), [CAPTION], minilm_path())


def test_replacements_never_touch_colours_or_garments(minilm_perturber):
    assert minilm_perturber.neighbours["carrying"] and "walking" not in minilm_perturber.neighbours  # "walking shoes"
    for word, options in minilm_perturber.neighbours.items():
        assert word not in PROTECTED and not set(options) & PROTECTED, (word, options)
    changed = 0
    for seed in range(200):
        text = minilm_perturber(CAPTION, np.random.default_rng(seed))
        assert _colour_and_garment_words(text) == _colour_and_garment_words(CAPTION)
        assert len(text.split()) == len(CAPTION.split())
        changed += text != CAPTION
    assert changed == 200  # with probability 1 and replaceable words, every call changes something


def test_delete_keeps_attribute_words_and_crop_keeps_a_contiguous_window():
    delete = ApproximateText(1.0, 0.3, (0.0, 1.0, 0.0))
    crop = ApproximateText(1.0, 0.3, (0.0, 0.0, 1.0))
    words = CAPTION.split()
    for seed in range(100):
        deleted = delete(CAPTION, np.random.default_rng(seed))
        assert _colour_and_garment_words(deleted) == _colour_and_garment_words(CAPTION)
        assert len(deleted.split()) < len(words)
        cropped = crop(CAPTION, np.random.default_rng(seed)).split()
        assert len(cropped) == len(words) - round(0.3 * len(words))
        start = next(i for i in range(len(words)) if words[i : i + len(cropped)] == cropped)
        assert start >= 0


def test_probability_and_seed_govern_the_change():
    perturb = ApproximateText(0.25, 0.2, neighbours=lexicon_neighbours())
    outcomes = [perturb(CAPTION, np.random.default_rng(seed)) != CAPTION for seed in range(400)]
    assert 0.18 < np.mean(outcomes) < 0.32
    assert perturb(CAPTION, np.random.default_rng(7)) == perturb(CAPTION, np.random.default_rng(7))
    assert ApproximateText(0.0, 0.5)(CAPTION, np.random.default_rng(0)) == CAPTION


def test_embedding_neighbours_are_the_closest_changeable_words():
    vocabulary = {"heading": 0, "strolling": 1, "red": 2, "[unused1]": 3, "moving": 4, "shirt": 5, "headings": 6}
    embeddings = np.array([[1, 0], [0.9, 0.1], [1, 0.01], [1, 0], [0.5, 0.5], [1, 0], [1, 0]], dtype=np.float32)
    table = embedding_neighbours(["heading", "red", "shirt"], vocabulary, embeddings, top_k=2, min_similarity=0.5)
    # never a colour, a garment, a special token or a plural of the word itself
    assert table == {"heading": ("strolling", "moving")}


def test_online_text_weights_are_validated():
    with pytest.raises(ConfigError, match=r"'variants\.pdg\.online\.text_weights' must be 3"):
        params_from_dict({"variants": {"pdg": {"online": {"text_weights": [1.0, 1.0]}}}})
    with pytest.raises(ConfigError, match="unknown key 'variants.pdg.online.mix'"):
        params_from_dict({"variants": {"pdg": {"online": {"mix": 1}}}})


def test_mixed_targets_equal_the_hand_computed_affinities():
    ids = torch.tensor([0, 1, 2, 0])
    permutation = torch.tensor([1, 0, 3, 2])
    lam = torch.tensor([0.7, 0.6, 1.0, 0.5])
    targets = mixed_pair_targets(ids, permutation, lam, identity_positives=True)
    # mixed sample 0 = 0.7*s0 + 0.3*s1; sample 1 = 0.6*s1 + 0.4*s0; 2 = s2 (lam 1); 3 = 0.5*s3 + 0.5*s2
    w = torch.tensor([[0.7, 0.3, 0, 0], [0.4, 0.6, 0, 0], [0, 0, 1.0, 0], [0, 0, 0.5, 0.5]])
    match = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.float)
    assert torch.allclose(targets, w @ match @ w.T)
    assert torch.isclose(targets[0, 3], torch.tensor(0.7 * 0.5))  # s0 and s3 share a person
    unmixed = mixed_pair_targets(ids, torch.arange(4), torch.ones(4), identity_positives=False)
    assert torch.equal(unmixed, torch.eye(4))


def test_the_loss_with_mixed_targets_prefers_the_mixed_partners():
    torch.manual_seed(0)
    ids = torch.arange(4)
    permutation, lam = torch.tensor([1, 0, 3, 2]), torch.full((4,), 0.6)
    targets = mixed_pair_targets(ids, permutation, lam)
    base = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    mixed = torch.nn.functional.normalize(0.6 * base + 0.4 * base[permutation], dim=-1)
    loss = HardnessAwareContrastiveLoss()
    aligned = loss(mixed, mixed, ids, 0.1, targets)
    shuffled = loss(mixed, mixed[torch.tensor([2, 3, 0, 1])], ids, 0.1, targets)
    assert aligned < shuffled


@pytest.fixture(scope="module")
def tiny_params(tmp_path_factory):
    online = {"text_prob": 0.5, "mixup_prob": 1.0, "mixup_layer": 0, "embedding_neighbours": False}
    raw = deep_merge(deep_merge(TINY_PROFILE, TINY_TRAINING), {"train": {"epochs": 8, "lr": 0.003}})
    raw["variants"] = {"baseline": {"data": "x"}, "pdg": {"data": "x", "online": online}}
    params = params_from_dict(raw)
    folder = tmp_path_factory.mktemp("prepared")
    prepare(params, folder)
    return params, folder


def _fit(params, folder, out_dir, variant):
    variant = params.variants[variant].__class__(data=str(folder), online=params.variants[variant].online)
    trainer = Trainer(params, folder, RunFolder(out_dir), make_accelerator(params, cpu=True), variant)
    return trainer.fit()


def test_a_mixup_layer_beyond_the_towers_names_its_whole_key(tiny_params, tmp_path):
    params, folder = tiny_params
    online = dataclasses.replace(params.variants["pdg"].online, mixup_layer=params.model.layers)
    variant = dataclasses.replace(params.variants["pdg"], data=str(folder), online=online)
    with pytest.raises(FieldError) as caught:
        Trainer(params, folder, RunFolder(tmp_path), make_accelerator(params, cpu=True), variant)
    assert str(caught.value.under("variants.pdg")) == (
        f"params: 'variants.pdg.online.mixup_layer' {params.model.layers} must be below {params.model.layers}, "
        "the number of layers of the shallower tower")


def test_training_with_online_pdg_learns_and_is_deterministic(tiny_params, tmp_path):
    params, folder = tiny_params
    first = _fit(params, folder, tmp_path / "a", "pdg")
    again = _fit(params, folder, tmp_path / "b", "pdg")
    plain = _fit(params, folder, tmp_path / "c", "baseline")
    losses = [loss for _, loss in first.losses]
    assert losses == [loss for _, loss in again.losses]
    assert losses != [loss for _, loss in plain.losses]
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.1
