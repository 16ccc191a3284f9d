"""The dual encoder: every preset built from tiny random towers, nothing downloaded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPModel,
    ViTConfig,
    ViTModel,
)

from pipeline.core.config import MODEL_PRESETS, ConfigError, ModelConfig
from pipeline.models import (
    CLIP_MEAN,
    CLIP_STD,
    CONFIG_NAME,
    WEIGHTS_NAME,
    DualEncoder,
    FeatureMix,
    ImagePreprocessor,
    build_model,
    tokenize,
    train_caption_tokenizer,
)
from pipeline.models.dual_encoder import PRESETS
from tiny_models import CAPTIONS, TINY, save_tiny_clip

SAVED_FILES = {
    WEIGHTS_NAME,
    CONFIG_NAME,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
}


def save_tiny_vit_bert(folder: Path) -> tuple[Path, Path]:
    """A random square 32x32 ViT and a random BERT with a WordPiece vocab.txt."""
    vision, text = folder / "vit", folder / "bert"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(vision)
    words = sorted({w.strip(".,").lower() for caption in CAPTIONS for w in caption.split()})
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *words])}
    BertTokenizer(vocab=vocab).save_pretrained(text)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(text)
    return vision, text


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("checkpoints")
    clip = save_tiny_clip(root / "clip")
    return {"clip-vit-b16": (clip, clip), "vit-bert": save_tiny_vit_bert(root)}


# (input size, config fields); the path presets' towers were made at 32x32. The tiny CLIP
# tokenizer spells most words letter by letter, hence its longer captions.
SETTINGS = {
    "tiny-bert": ((32, 16), {"preset": "tiny", "text_encoder": "bert"}),
    "tiny-minilm": ((32, 16), {"preset": "tiny", "text_encoder": "minilm"}),
    # embed_dim: the checkpoint's projection_dim (another one is an error)
    "clip-vit-b16": ((64, 32), {"preset": "clip-vit-b16", "max_text_length": 64, "embed_dim": 24}),
    "vit-bert": ((64, 32), {"preset": "vit-bert"}),
}


def build(setting: str, checkpoints, **overrides) -> DualEncoder:
    image_size, fields = SETTINGS[setting]
    vision_path, text_path = checkpoints.get(fields["preset"], ("", ""))
    config = ModelConfig(vision_path=str(vision_path), text_path=str(text_path), **{**TINY, **fields, **overrides})
    torch.manual_seed(0)
    model = build_model(config, image_size, captions=CAPTIONS)
    return model.eval()


def batch(model: DualEncoder, size: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(size, 3, *model.image_size, generator=generator)
    text = tokenize(model.tokenizer, CAPTIONS[:size], model.config.max_text_length)
    assert text["attention_mask"].sum(1).unique().numel() > 1, "captions of different lengths test the masks"
    return {"pixel_values": pixels, **text}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_embeddings_are_unit_vectors_of_embed_dim(setting, checkpoints):
    model = build(setting, checkpoints)
    with torch.no_grad():
        image_emb, text_emb = model(**batch(model))
    assert image_emb.shape == text_emb.shape == (4, model.config.embed_dim)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(4))


def images(count: int) -> list[Image.Image]:
    """Differently sized random RGB images (the preprocessor resizes them)."""
    generator = torch.Generator().manual_seed(2)
    shapes = [(40 + i, 20 + 2 * i, 3) for i in range(count)]
    return [Image.fromarray(torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8).numpy()) for shape in shapes]


@pytest.mark.parametrize("setting", ["tiny-bert", "clip-vit-b16"])
def test_embed_texts_and_images_equal_the_manual_batches(setting, checkpoints):
    model = build(setting, checkpoints)
    texts, pictures = CAPTIONS[:5], images(5)
    with torch.no_grad():  # what the callers wrote by hand before: tokenise or preprocess, encode, cast
        tokens = [tokenize(model.tokenizer, texts[s : s + 2], model.config.max_text_length) for s in range(0, 5, 2)]
        expected_texts = torch.cat([model.encode_text(**batch).float() for batch in tokens])
        pixels = torch.stack([model.image_preprocessor(image) for image in pictures])
        expected_images = torch.cat([model.encode_image(pixels[s : s + 2]).float() for s in range(0, 5, 2)])
    text_emb, image_emb = model.embed_texts(texts, batch_size=2), model.embed_images(pictures, batch_size=2)
    assert torch.equal(text_emb, expected_texts) and torch.equal(image_emb, expected_images)
    assert torch.equal(model.embed_images(pixels, batch_size=2), expected_images)  # preprocessed pixels
    assert torch.equal(model.embed_images(iter(pictures), batch_size=2), expected_images)  # read lazily
    for emb in (text_emb, image_emb):
        assert emb.dtype == torch.float32 and emb.shape == (5, model.config.embed_dim) and not emb.requires_grad
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5))
    # the batch size changes how the work is split, not the answer
    for batch_size in (1, 3, 64):
        torch.testing.assert_close(model.embed_texts(texts, batch_size=batch_size), text_emb, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.embed_images(pictures, batch_size=batch_size), image_emb, rtol=0, atol=1e-6)


def test_embedding_runs_in_eval_mode_and_restores_the_mode(checkpoints):
    model = build("tiny-bert", checkpoints, dropout=0.5)
    expected = model.embed_texts(CAPTIONS, batch_size=4)
    model.train()
    assert torch.equal(model.embed_texts(CAPTIONS, batch_size=4), expected)  # no dropout
    assert model.training and all(module.training for module in model.modules())
    empty = model.embed_images([], batch_size=4)
    assert empty.shape == (0, model.config.embed_dim) and empty.dtype == torch.float32
    with pytest.raises(ValueError, match="batch_size"):
        model.embed_texts(CAPTIONS, batch_size=0)


def test_build_and_reload_read_one_preset_table():
    assert set(PRESETS) == set(MODEL_PRESETS)
    model = build_model(ModelConfig(**TINY), (32, 16), captions=CAPTIONS)
    assert isinstance(model, DualEncoder) and model.tokenizer is not None
    assert model.text_tower.pooling == PRESETS["tiny"].text_pooling


def test_temperature_is_positive_and_learnable(checkpoints):
    model = build("tiny-bert", checkpoints, init_temperature=0.05, learn_temperature=True)
    assert model.temperature().item() == pytest.approx(0.05)
    image_emb, text_emb = model(**batch(model))
    (image_emb @ text_emb.T / model.temperature()).logsumexp(1).mean().backward()
    assert model.log_temperature.requires_grad and model.log_temperature.grad is not None


def test_fixed_temperature_is_a_buffer_not_a_parameter(checkpoints):
    model = build("tiny-bert", checkpoints, learn_temperature=False)
    assert model.temperature().item() == pytest.approx(ModelConfig().init_temperature)
    assert "log_temperature" not in dict(model.named_parameters())
    assert "log_temperature" in model.state_dict()


def test_pretrained_text_tower_uses_its_checkpoint(checkpoints):
    minilm = build("tiny-minilm", checkpoints)
    assert minilm.text_tower.model.config.hidden_size == 384 and minilm.text_tower.pooling == "mean"
    assert minilm.text_projection.in_features == 384
    clip = build("clip-vit-b16", checkpoints)
    assert clip.image_preprocessor.mean == CLIP_MEAN and clip.image_preprocessor.std == CLIP_STD
    # CLIP's own projections are the last layers: nothing random stacked on the pretrained alignment
    assert isinstance(clip.image_projection, torch.nn.Identity) and isinstance(clip.text_projection, torch.nn.Identity)


def test_clip_embed_dim_other_than_the_checkpoint_projection_is_an_error(checkpoints):
    with pytest.raises(ConfigError, match=r"'model\.embed_dim' is 16, but the CLIP checkpoint .* projects to 24"):
        build("clip-vit-b16", checkpoints, embed_dim=16)


def test_a_float16_checkpoint_gives_float32_master_weights(tmp_path):
    clip = save_tiny_clip(tmp_path / "clip32")
    half = tmp_path / "clip16"
    CLIPModel.from_pretrained(clip, dtype=torch.float16).save_pretrained(half)
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer.json"):
        if (clip / name).is_file():
            shutil.copy(clip / name, half / name)
    stored = CLIPModel.from_pretrained(half)  # transformers 5 keeps the stored dtype by default
    assert next(stored.parameters()).dtype == torch.float16, "the checkpoint really is half precision"
    model = build("clip-vit-b16", {"clip-vit-b16": (half, half)})
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert set(dtypes.values()) == {torch.float32}, {n: d for n, d in dtypes.items() if d != torch.float32}


def test_vit_bert_towers_load_float32_from_a_float16_checkpoint(checkpoints, tmp_path):
    vision, text = checkpoints["vit-bert"]
    halves = []
    for folder, model_class in ((vision, ViTModel), (text, BertModel)):
        target = tmp_path / folder.name
        shutil.copytree(folder, target)
        model_class.from_pretrained(folder, dtype=torch.float16).save_pretrained(target)
        halves.append(target)
    model = build("vit-bert", {"vit-bert": tuple(halves)})
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_save_and_load_give_identical_embeddings_without_the_source_checkpoints(setting, checkpoints, tmp_path):
    model = build(setting, checkpoints)
    inputs = batch(model)
    model.save_pretrained(tmp_path / "saved")
    files = {path.name for path in (tmp_path / "saved").iterdir()}
    assert {WEIGHTS_NAME, CONFIG_NAME} <= files <= SAVED_FILES, files

    # The saved JSON still names the original checkpoints: move them away to prove they are not read.
    moved = {preset: tuple(tmp_path / f"gone-{preset}-{i}" for i in range(2)) for preset in checkpoints}
    for preset, paths in checkpoints.items():
        for source, target in zip(paths, moved[preset]):
            if source.exists():
                shutil.move(source, target)
    try:
        loaded = DualEncoder.from_pretrained(tmp_path / "saved")
    finally:
        for preset, paths in checkpoints.items():
            for source, target in zip(paths, moved[preset]):
                if target.exists():
                    shutil.move(target, source)

    assert tokenize(loaded.tokenizer, CAPTIONS[:4], model.config.max_text_length)["input_ids"].equal(inputs["input_ids"])
    assert loaded.config == model.config and loaded.image_preprocessor == model.image_preprocessor
    with torch.no_grad():
        for expected, actual in zip(model(**inputs), loaded(**inputs)):
            assert torch.equal(expected, actual)
    assert torch.equal(loaded.temperature(), model.temperature())


def test_loading_a_folder_without_a_saved_model_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"expected {tmp_path / CONFIG_NAME}"):
        DualEncoder.from_pretrained(tmp_path)


def test_caption_tokenizer_is_deterministic_lowercase_bert_style():
    first = train_caption_tokenizer(CAPTIONS * 3, vocab_size=150)
    second = train_caption_tokenizer(list(CAPTIONS * 3), vocab_size=150)
    assert first.get_vocab() == second.get_vocab()
    assert [first.convert_ids_to_tokens(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ids = first("RED Coat")["input_ids"]
    assert first.convert_ids_to_tokens(ids) == ["[CLS]", "red", "coat", "[SEP]"]


def test_tiny_bert_needs_a_tokenizer_or_captions():
    with pytest.raises(ValueError, match="captions"):
        build_model(ModelConfig(**TINY), (32, 16))
    with pytest.raises(ValueError, match="vision_path"):
        build_model(ModelConfig(preset="clip-vit-b16", **TINY), (64, 32))


def test_clip_text_read_out_matches_clip_itself(checkpoints):
    model = build("clip-vit-b16", checkpoints)
    inputs = batch(model)
    with torch.no_grad():
        expected = model.text_tower.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        actual = model.text_tower(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(actual, expected.text_embeds)


def test_non_square_input_interpolates_the_square_position_grid(checkpoints):
    model = build("clip-vit-b16", checkpoints)
    grid = model.image_tower.model.vision_model.embeddings.position_embedding.num_embeddings
    assert grid == 1 + (32 // 8) ** 2  # the table stays the checkpoint's 4x4 grid
    tall = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert model.encode_image(tall).shape == (2, model.config.embed_dim)
        assert model.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, model.config.embed_dim)


def test_image_preprocessor_resizes_and_normalises():
    preprocessor = ImagePreprocessor(height=32, width=16, mean=CLIP_MEAN, std=CLIP_STD)
    tensor = preprocessor(Image.new("RGB", (30, 70), (255, 255, 255)))
    assert tensor.shape == (3, 32, 16)
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(tensor[:, 5, 5], expected)


@pytest.mark.parametrize("setting", ["tiny-bert", "tiny-minilm", "clip-vit-b16"])
def test_feature_mixup_interpolates_between_a_sample_and_its_partner(setting, checkpoints):
    model = build(setting, checkpoints)
    inputs = batch(model)
    permutation = torch.tensor([2, 0, 3, 1])

    def embed(lam):
        with torch.no_grad():
            return model(**inputs, mix=None if lam is None else FeatureMix(layer=0, permutation=permutation, lam=lam))

    plain_image, plain_text = embed(None)
    for mixed, plain in zip(embed(1.0), (plain_image, plain_text)):
        torch.testing.assert_close(mixed, plain, atol=1e-5, rtol=0)
    for mixed, plain in zip(embed(0.0), (plain_image, plain_text)):
        torch.testing.assert_close(mixed, plain[permutation], atol=1e-5, rtol=0)
    for mixed, plain in zip(embed(torch.full((4,), 0.5)), (plain_image, plain_text)):
        assert (mixed - plain).abs().amax(1).min() > 1e-4
        assert (mixed - plain[permutation]).abs().amax(1).min() > 1e-4
    for after, before in zip(embed(None), (plain_image, plain_text)):
        assert torch.equal(after, before)  # the hooks are gone


def test_a_few_steps_reduce_a_contrastive_loss(checkpoints):
    model = build("tiny-bert", checkpoints, init_temperature=0.1).train()
    inputs = batch(model, size=6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    targets = torch.arange(6)

    def info_nce() -> torch.Tensor:
        image_emb, text_emb = model(**inputs)
        logits = image_emb @ text_emb.T / model.temperature()
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    losses = []
    for _ in range(10):
        loss = info_nce()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
