"""The embedded generator, its caption tokenizer and the attribute probe, at toy sizes."""

import dataclasses
import json
import math
import os
import shutil
import subprocess

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, StableDiffusionPipeline

from pipeline.core.config import params_from_dict
from pipeline.data.synthpedes import COLOR_NAMES
from pipeline.generator.caption_tokenizer import colour_words, train_caption_tokenizer
from pipeline.generator.build import build_text_encoder, build_unet, build_vae, _groups
from pipeline.generator.checkpoint import load_pretrained_pipeline, pretrained_sample_size, resolve_generator, save_pipeline, write_pretrained_pointer
from pipeline.generator.data import load_grid_images, load_images
from pipeline.generator.samples import plot_loss_curves, plot_no_training, plot_sample_grid, sample_images
from pipeline.generator.training import encode_latents, _random_crop, reconstruction_psnr, sample_timesteps, set_latent_scale, tokenize_captions, train_generator, train_unet, train_vae
from pipeline.optimization import warmup_cosine_schedule
from pipeline.generator.probe import (
    LOWER_CLASSES,
    LOWER_NOUNS,
    UPPER_CLASSES,
    UPPER_NOUNS,
    AttributeProbe,
    colour_prompts,
    names_colour,
    predict_colours,
    probe_accuracy,
    prompted_color_accuracy,
    train_probe,
)
from PIL import Image
from transformers import BertModel

from pipeline.models import minilm_path
from pipeline.editing.edit import EditRequest, edit_p2p_batch
from pipeline.editing.settings import EditSettings
from pipeline.generator.model import load_generator
from tiny_generator import build_tiny_generator
from tiny_project import (REPO, TINY_GENERATOR_PARAMS, TINY_PROFILE, deep_merge, dvc, make_tiny_project, stage_command,
                          stale_stages)

HEIGHT, WIDTH = TINY_GENERATOR_PARAMS["height"], TINY_GENERATOR_PARAMS["width"]
TINY_GENERATOR = params_from_dict({"generator": TINY_GENERATOR_PARAMS}).generator


@pytest.fixture(scope="module")
def train_images(prepared):
    return load_images(prepared, "train", HEIGHT, WIDTH)


def _mean(losses):
    return sum(loss for _, loss in losses) / len(losses)


def test_images_load_at_the_generator_size_with_captions_and_attributes(train_images):
    assert train_images.pixels.shape == (16 * 2, 3, HEIGHT, WIDTH)
    assert -1 <= train_images.pixels.min() < train_images.pixels.max() <= 1
    assert len(train_images.captions) == 32 and all(train_images.captions)
    assert train_images.attributes[0]["upper_color"] in COLOR_NAMES


def test_tokenizer_keeps_colour_words_whole_and_is_deterministic():
    captions = ["A man in a turquoise jacket and grey pants.", "A woman wearing a pink dress."]
    tokenizer = train_caption_tokenizer(captions, max_length=32)
    for word in colour_words():  # also the colours the captions never use
        assert len(tokenizer(f" {word} ", add_special_tokens=False).input_ids) == 1, word
    swapped = [tokenizer(f"a {c} shirt").input_ids for c in COLOR_NAMES]
    assert len({len(ids) for ids in swapped}) == 1  # a colour swap keeps every other position
    unseen = tokenizer("zebra-striped", add_special_tokens=False).input_ids
    assert unseen and tokenizer.unk_token_id not in unseen  # unseen words still encode, byte by byte
    again = train_caption_tokenizer(list(reversed(captions)), max_length=32)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_vae_and_unet_losses_fall(train_images):
    torch.manual_seed(0)
    vae = build_vae(TINY_GENERATOR)
    vae_losses = train_vae(vae, train_images.pixels, TINY_GENERATOR, show_progress=False)
    assert _mean(vae_losses[-8:]) < 0.7 * _mean(vae_losses[:8])
    assert reconstruction_psnr(vae, train_images.pixels) > 12

    tokenizer = train_caption_tokenizer([c for cs in train_images.captions for c in cs], max_length=32)
    caption_ids, empty_ids = tokenize_captions(tokenizer, train_images.captions)
    latents = encode_latents(vae, train_images.pixels)
    assert latents.shape == (64, 4, HEIGHT // 2, WIDTH // 2)  # every image and its mirror image
    scale = set_latent_scale(vae, latents)
    unet, text_encoder = build_unet(TINY_GENERATOR), build_text_encoder(TINY_GENERATOR, tokenizer)
    unet_losses = train_unet(unet, text_encoder, latents, caption_ids, empty_ids, scale, TINY_GENERATOR,
                             show_progress=False)
    assert all(torch.isfinite(torch.tensor([loss for _, loss in unet_losses])))
    assert _mean(unet_losses[-10:]) < 0.8 * _mean(unet_losses[:10])


def test_vae_on_crops_and_the_unet_with_biased_timesteps_and_averaging_learn(train_images):
    cfg = dataclasses.replace(TINY_GENERATOR, vae_crop_fraction=0.5, high_noise_fraction=0.8, ema_decay=0.9)
    torch.manual_seed(0)
    vae = build_vae(cfg)
    vae_losses = train_vae(vae, train_images.pixels, cfg, show_progress=False)
    assert _mean(vae_losses[-8:]) < 0.7 * _mean(vae_losses[:8])
    assert reconstruction_psnr(vae, train_images.pixels) > 12  # trained on half-size crops, decodes whole images
    tokenizer = train_caption_tokenizer([c for cs in train_images.captions for c in cs], max_length=32)
    caption_ids, empty_ids = tokenize_captions(tokenizer, train_images.captions)
    latents = encode_latents(vae, train_images.pixels)
    unet, text_encoder = build_unet(cfg), build_text_encoder(cfg, tokenizer)
    losses = train_unet(unet, text_encoder, latents, caption_ids, empty_ids, set_latent_scale(vae, latents), cfg,
                        show_progress=False)
    assert _mean(losses[-10:]) < 0.8 * _mean(losses[:10])


def test_random_crops_are_windows_at_the_latent_multiple():
    batch = torch.arange(2 * 3 * 64 * 32, dtype=torch.float32).view(2, 3, 64, 32)
    crop = _random_crop(batch, 0.5, 4, torch.Generator().manual_seed(1))
    assert crop.shape == (2, 3, 32, 16)
    top, left = divmod(int(crop[0, 0, 0, 0]), 32)
    assert torch.equal(crop, batch[..., top : top + 32, left : left + 16])
    assert _random_crop(batch, 0.3, 4, torch.Generator()).shape[-2:] == (20, 8)  # 19.2 -> 20, 9.6 -> 8
    assert _random_crop(batch, 1.0, 4, torch.Generator()) is batch


def test_timesteps_come_from_the_noisier_half_at_the_given_share():
    generator = torch.Generator().manual_seed(0)
    assert sample_timesteps(500, 1000, 1.0, generator).min() >= 500
    assert sample_timesteps(500, 1000, 0.0, generator).max() < 500
    share = (sample_timesteps(20000, 1000, 0.75, generator) >= 500).float().mean().item()
    assert abs(share - 0.75) < 0.02
    uniform = sample_timesteps(20000, 1000, 0.5, generator)
    assert abs(uniform.float().mean().item() - 499.5) < 8 and uniform.max() == 999


def test_every_loop_warms_up_then_decays_to_zero_on_one_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine_schedule(optimizer, total_steps=20, warmup_fraction=0.2)  # 4 warm-up steps
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step(), schedule.step()
    assert rates[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert rates[12] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert rates[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16))) and rates[-1] < 0.01
    # fewer steps than one warm-up step's share: still one warm-up step, never a division by zero
    tiny = warmup_cosine_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 3, 0.05)
    assert tiny.get_last_lr() == [1.0]


def test_group_norm_groups_keep_at_least_four_channels():
    assert _groups((32, 32, 64)) == 8 and _groups((64, 128)) == 16 and _groups((48, 96)) == 12
    assert _groups((8, 16)) == 2 and _groups((3,)) == 1
    assert build_vae(dataclasses.replace(TINY_GENERATOR, vae_channels=(8, 16))).encoder.conv_norm_out.num_groups == 2


def test_trained_generator_saves_loads_and_samples(train_images, tmp_path):
    cfg = dataclasses.replace(TINY_GENERATOR, vae_steps=3, unet_steps=3)
    trained = train_generator(cfg, train_images, show_progress=False)
    assert set(trained.seconds) == {"vae", "unet"} and len(trained.unet_losses) == 3
    folder = save_pipeline(trained.sd, tmp_path / "generator")
    assert resolve_generator(folder) == str(folder)
    loaded = StableDiffusionPipeline.from_pretrained(folder)
    images = sample_images(loaded, ["a man in a red jacket", "a woman in a blue dress"], guidance=4.0, steps=2)
    assert images.shape == (2, 3, HEIGHT, WIDTH) and 0 <= images.min() <= images.max() <= 1
    again = sample_images(loaded, ["a man in a red jacket"], guidance=4.0, steps=2)
    assert torch.allclose(again[0], images[0], atol=1e-4)  # prompt i's noise depends only on its index
    plot_loss_curves(trained, tmp_path / "curves.png")
    plot_sample_grid(train_images.pixels[:2], images[:, None], ["a", "b"], tmp_path / "grid.png", "samples")
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "grid.png").stat().st_size > 0


def test_the_minilm_text_encoder_is_frozen_and_the_pipeline_loads_and_edits(train_images, tmp_path):
    cfg = dataclasses.replace(TINY_GENERATOR, vae_steps=2, unet_steps=4, text_encoder="minilm", prompt_tokens=24,
                              minilm_layers=2)
    full = BertModel.from_pretrained(minilm_path()).eval()
    before = {k: v.clone() for k, v in full.state_dict().items()}
    trained = train_generator(cfg, train_images, show_progress=False)
    encoder = trained.sd.text_encoder
    assert isinstance(encoder, BertModel) and trained.sd.unet.config.cross_attention_dim == 384
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # frozen
    folder = save_pipeline(trained.sd, tmp_path / "generator")
    parts = load_generator(folder)
    assert parts.tokenizer.model_max_length == 24
    # the saved encoder is MiniLM's first two layers: its output is the full model's second hidden states
    ids = parts.tokenizer(["a man in a red shirt and blue jeans"], return_tensors="pt").input_ids
    assert parts.text_encoder.config.num_hidden_layers == 2
    with torch.no_grad():
        expected = full(ids, output_hidden_states=True).hidden_states[2]
        assert torch.allclose(parts.text_encoder(ids)[0], expected, atol=1e-5)
        assert not torch.allclose(full(ids)[0], expected, atol=1e-2)
    request = EditRequest(Image.new("RGB", (WIDTH, HEIGHT), (200, 20, 20)), "a man in a red shirt",
                          "a man in a turquoise shirt", [((11, 14), (11, 20))])
    settings = EditSettings(num_steps=2, guidance=4.0, inversion="ddim", null_text_steps=0, cross_replace_fraction=0.8,
                            self_replace_fraction=0.4, blend_threshold=0.3, blend_start_fraction=0.2, reweight=2.0,
                            strength=0.6)
    (result,) = edit_p2p_batch(parts, [request], settings)
    assert result.image.size == (WIDTH, HEIGHT)


def test_a_pretrained_checkpoint_is_pointed_at_not_copied(tmp_path):
    write_pretrained_pointer(tmp_path / "generator", "stabilityai/some-checkpoint")
    assert resolve_generator(tmp_path / "generator") == "stabilityai/some-checkpoint"


def test_probe_learns_and_round_trips(train_images, tmp_path):
    probe, losses = train_probe(train_images, epochs=30, batch_size=16, channels=8, show_progress=False)
    assert _mean(losses[-10:]) < 0.6 * _mean(losses[:10])
    accuracy = probe_accuracy(probe, train_images)
    assert accuracy["upper"] > 3 * 100 / len(COLOR_NAMES)  # well above chance
    loaded = AttributeProbe.load(probe.save(tmp_path / "probe"))
    assert predict_colours(loaded, train_images.pixels) == predict_colours(probe, train_images.pixels)


def test_colour_mentions_are_bound_to_the_garment():
    assert names_colour("a yellow and pink striped zip-up jacket", "yellow", UPPER_NOUNS)
    assert names_colour("a hoodie that is grey", "gray", UPPER_NOUNS)
    assert not names_colour("blue jeans and a red shirt", "blue", UPPER_NOUNS)
    assert not names_colour("red shoes and blue jeans", "red", LOWER_NOUNS)
    assert names_colour("a pair of blue denim jeans", "blue", LOWER_NOUNS)


def test_prompted_colour_accuracy_counts_each_garment(train_images, tmp_path):
    prompts = colour_prompts(train_images, limit=6)
    assert prompts and all(p.upper or p.lower for p in prompts)
    trained = train_generator(dataclasses.replace(TINY_GENERATOR, vae_steps=2, unet_steps=2), train_images,
                              show_progress=False)
    uppers = [p.upper for p in prompts if p.upper]
    lowers = [p.lower for p in prompts if p.lower]
    read_upper, read_lower = max(set(uppers), key=uppers.count), max(set(lowers), key=lowers.count)

    class ReadsOneColour(torch.nn.Module):  # a probe that reads the same colours off every image
        def forward(self, pixels):
            upper = torch.zeros(len(pixels), len(UPPER_CLASSES))
            lower = torch.zeros(len(pixels), len(LOWER_CLASSES))
            upper[:, UPPER_CLASSES.index(read_upper)] = lower[:, LOWER_CLASSES.index(read_lower)] = 1.0
            return upper, lower

    result = prompted_color_accuracy(trained.sd, ReadsOneColour(), prompts, guidance=2.0, steps=2)
    assert result["upper_prompts"] == len(uppers) and result["lower_prompts"] == len(lowers)
    assert result["upper"] == pytest.approx(100 * uppers.count(read_upper) / len(uppers))
    assert result["lower"] == pytest.approx(100 * lowers.count(read_lower) / len(lowers))


def _run_stage(project, generator_overrides, generator_ids=0, returncode=0):
    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_PROFILE)
    params = deep_merge(params, {"generator": {**TINY_GENERATOR_PARAMS, **generator_overrides},
                                 "synth": {"num_generator_ids": generator_ids}})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(stage_command("train_generator"), cwd=project, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == returncode, result.stderr[-3000:]
    if returncode:
        return [line for line in result.stderr.splitlines() if " ERROR " in line]
    return json.loads((project / "metrics" / "generator.json").read_text())


def _assert_png(path, min_size=(200, 100)):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_size[0] and image.height >= min_size[1]


@pytest.mark.slow  # a stage in a subprocess or several processes: seconds, not milliseconds
def test_stage_trains_or_points_at_a_pretrained_checkpoint(prepared, tmp_path):
    shutil.copytree(prepared, tmp_path / "data" / "prepared")
    metrics = _run_stage(tmp_path, {"vae_steps": 2, "unet_steps": 2, "sample_steps": 2}, generator_ids=5)
    assert (metrics["generator"]["train_images"], metrics["generator"]["pool_images"]) == (16 * 2, 5 * 2)
    # two training steps: a blurry autoencoder, but far from noise; a probe on 32 images beats chance (1 in 12)
    assert 5 < metrics["generator"]["vae_val_psnr_db"] < 40 and metrics["probe"]["val_accuracy"]["upper"] > 100 / 12
    assert metrics["generator"]["prompted_color_accuracy"]["upper_prompts"] > 0
    assert (tmp_path / "models" / "generator" / "model_index.json").is_file()
    assert AttributeProbe.load(tmp_path / "models" / "probe")
    assert {p.name for p in (tmp_path / "reports" / "generator").iterdir()} == {"loss_curves.png", "samples.png",
                                                                               "timing.json"}

    pretrained = str(build_tiny_generator(tmp_path / "tiny-sd", max_tokens=77))
    metrics = _run_stage(tmp_path, {"pretrained": pretrained, "sample_steps": 2})
    assert metrics["pretrained"] == pretrained and "generator" not in metrics
    assert resolve_generator(tmp_path / "models" / "generator") == pretrained
    assert not (tmp_path / "models" / "generator" / "model_index.json").exists()
    assert [p.name for p in (tmp_path / "models" / "probe").iterdir()] == ["absent.json"]
    # the same report files as a trained generator's: a real sample grid, and a figure saying nothing trained
    assert {p.name for p in (tmp_path / "reports" / "generator").iterdir()} == {"loss_curves.png", "samples.png",
                                                                               "timing.json"}
    for name in ("loss_curves.png", "samples.png"):
        _assert_png(tmp_path / "reports" / "generator" / name)
    assert metrics["sample_grid"] == {"prompts": 4, "samples": 2, "height": HEIGHT, "width": WIDTH, "steps": 2}
    timing = json.loads((tmp_path / "reports" / "generator" / "timing.json").read_text())
    assert timing["seconds"]["sample_grid"] > 0 and timing["stage_seconds"] > 0 and "seconds" not in metrics

    missing = tmp_path / "no-such-sd"
    (line,) = _run_stage(tmp_path, {"pretrained": str(missing)}, returncode=1)
    assert "'generator.pretrained'" in line and str(missing) in line and "no such folder" in line


def test_a_pretrained_checkpoint_samples_person_shaped_and_its_grid_reads_few_val_images(prepared, tmp_path):
    pipeline = load_pretrained_pipeline(str(build_tiny_generator(tmp_path / "tiny-sd", max_tokens=77)))
    assert isinstance(pipeline.scheduler, DDIMScheduler) and pipeline.unet.dtype == torch.float32
    assert pretrained_sample_size(pipeline) == (HEIGHT, WIDTH)  # the tiny model's own size
    pipeline.unet.register_to_config(sample_size=64)  # Stable Diffusion 1.x: square 512, sampled person-shaped
    assert pretrained_sample_size(pipeline) == (512, 192)
    grid = load_grid_images(prepared, "val", 40, 20, 3)
    assert grid.pixels.shape == (3, 3, 40, 20) and all(grid.captions)
    assert len(load_grid_images(prepared, "val", 40, 20, 100)) == 4 * 2  # at most the whole split
    plot_no_training("org/some-sd", tmp_path / "curves.png")
    _assert_png(tmp_path / "curves.png")


@pytest.mark.slow
def test_dvc_repro_train_generator_with_a_pretrained_checkpoint(tmp_path):
    """The stage's declared outputs (dvc.yaml) exist in the real profile too: dvc repro succeeds."""
    pretrained = str(build_tiny_generator(tmp_path / "tiny-sd", max_tokens=77))
    project = make_tiny_project(tmp_path / "project", {"generator": {"pretrained": pretrained, "sample_steps": 2}})
    dvc(project, "repro", "train_generator")
    for name in ("loss_curves.png", "samples.png"):
        _assert_png(project / "reports" / "generator" / name)
    metrics = json.loads((project / "metrics" / "generator.json").read_text())
    assert metrics["pretrained"] == pretrained and metrics["sample_grid"]["prompts"] == 4
    assert resolve_generator(project / "models" / "generator") == pretrained
    assert stale_stages(project, "train_generator") == {}
