"""Colour-edit sensitivity: the share of captions whose own image prefers the true text over a
colour-edited one, per garment kind, on encoders whose answer is known."""

from __future__ import annotations

import torch

import pipeline.evaluation as evaluation
from pipeline.evaluation import RetrievalSplit, colour_sensitivity, garment_kind
from pipeline.text.lexicon import PALETTE

CAPTIONS = [
    "A man in a red jacket and blue jeans.",
    "A woman wearing a green skirt and white shoes.",
    "A person with a black backpack.",
    "A man walking down the street.",  # nothing to edit
]


def colour_counts(captions) -> torch.Tensor:
    rows = [[float(text.lower().replace(".", "").split().count(c)) for c in PALETTE] + [1.0] for text in captions]
    return torch.nn.functional.normalize(torch.tensor(rows), dim=1)


def split() -> RetrievalSplit:
    return RetrievalSplit([f"k{i}" for i in range(4)], [b""] * 4, torch.arange(4), CAPTIONS, torch.arange(4), [0, 1, 2, 3])


def run(monkeypatch, encode, image_emb):
    model = torch.nn.Linear(1, 1)  # a stand-in: only embed_texts is used
    monkeypatch.setattr(model, "embed_texts", lambda captions, batch_size: encode(captions), raising=False)
    return colour_sensitivity(model, split(), encode(CAPTIONS), image_emb, 2, torch.device("cpu"))


def test_a_colour_reading_encoder_always_prefers_the_true_caption(monkeypatch):
    result = run(monkeypatch, colour_counts, colour_counts(CAPTIONS))
    assert result["captions"] == 4 and result["editable_captions"] == 3
    assert result["all"]["edits"] == 3 and result["all"]["prefers_true_pct"] == 100.0
    # true similarity 1 (image = its caption's vector); one of two or three colours changed
    assert 0.3 < result["all"]["mean_margin"] < 0.7
    assert sum(result[k]["edits"] for k in ("upper", "lower", "other") if k in result) == 3


def test_a_colour_blind_encoder_never_does_and_a_wrong_one_prefers_the_edit(monkeypatch):
    blind = run(monkeypatch, lambda captions: torch.ones(len(captions), 4) / 2, torch.ones(4, 4) / 2)
    assert blind["all"] == {"edits": 3, "prefers_true_pct": 0.0, "mean_margin": 0.0}
    # images that look like the edited captions: each prefers the edit
    edits = evaluation.edit_captions(CAPTIONS, 1, 0)
    looks_edited = colour_counts([e[0].edited if e else c for e, c in zip(edits, CAPTIONS)])
    wrong = run(monkeypatch, colour_counts, looks_edited)
    assert wrong["all"]["prefers_true_pct"] == 0.0 and wrong["all"]["mean_margin"] < -0.3


def test_garment_kind_reads_the_last_word_of_the_phrase():
    assert garment_kind("dark blue jeans") == "lower" and garment_kind("red T-shirt") == "upper"
    assert garment_kind("black backpack") == "other" and garment_kind("green skirts") == "lower"
