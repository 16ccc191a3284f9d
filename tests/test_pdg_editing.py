"""PDG image editing on a tiny random Stable-Diffusion-layout model saved to disk and loaded back."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.editing.alignment import align_word_swap, resample_matrix, tokens_in_span
from pipeline.editing.edit import EditRequest, edit_img2img, edit_p2p, edit_p2p_batch
from pipeline.editing.inversion import invert
from pipeline.generator.model import back_to_crop, fit_to_model, load_generator
from tiny_generator import TINY_WORDS, build_tiny_generator
from pipeline.editing.p2p import PromptToPromptController
from pipeline.editing.sampling import denoise
from pipeline.editing.settings import EditSettings

SOURCE = "a man in a red jacket and blue jeans"
EDITED = "a man in a turquoise jacket and blue jeans"
SPANS = [((11, 14), (11, 20))]  # "red" -> "turquoise"
FAST = EditSettings(
    num_steps=6, guidance=4.0, inversion="ddim", null_text_steps=0, cross_replace_fraction=0.8,
    self_replace_fraction=0.4, blend_threshold=0.3, blend_start_fraction=0.2, reweight=2.0, strength=0.6,
)
# no attention replaced for any step, no reweighting, blending (if any) from the first step
NO_CONTROL = replace(FAST, cross_replace_fraction=0.0, self_replace_fraction=0.0, reweight=1.0,
                     blend_start_fraction=0.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_generator(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def parts(model_dir):
    return load_generator(model_dir)


@pytest.fixture(scope="module")
def person() -> Image.Image:
    """A crop with a different aspect ratio than the model's, as real person crops have."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 18, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_load_generator_reads_the_saved_folder(parts):
    assert parts.image_size == (16, 32)
    assert parts.encode_prompts([SOURCE]).shape == (1, parts.tokenizer.model_max_length, 32)
    assert parts.images_to_latents([Image.new("RGB", (16, 32))]).shape == (1, 4, 16, 8)


def test_tiny_tokenizer_knows_its_words(parts):
    for word in TINY_WORDS:
        pieces = word.split("|")
        assert parts.tokenizer.tokenize(word.replace("|", "")) == pieces[:-1] + [pieces[-1] + "</w>"]


def test_tiny_tokenizer_gives_colours_unequal_token_counts(parts):
    assert tokens_in_span(parts.tokenizer, SOURCE, SPANS[0][0]) == [5]
    assert tokens_in_span(parts.tokenizer, EDITED, SPANS[0][1]) == [5, 6]


def test_word_swap_alignment_with_more_edited_tokens(parts):
    alignment = align_word_swap(parts.tokenizer, SOURCE, EDITED, SPANS)
    assert alignment.source_tokens == [5]
    assert alignment.edited_tokens == [5, 6]
    mapper = alignment.mapper
    assert torch.allclose(mapper.sum(1), torch.ones(len(mapper)))  # no attention is lost
    for shared in range(5):  # <start> a man in a
        assert mapper[shared, shared] == 1
    assert mapper[5, 5] == mapper[5, 6] == 0.5  # "red" feeds both halves of "turquoise"
    assert mapper[6, 7] == 1 and mapper[9, 10] == 1  # "jacket", "jeans" shift by one
    assert mapper[14, 15] == mapper[15, 15] == 1  # the last two padding tokens share the final place


def test_word_swap_alignment_with_fewer_edited_tokens_and_two_swaps(parts):
    source = "a woman in a magenta shirt and turquoise pants"
    edited = "a woman in a red shirt and green pants"
    spans = [((13, 20), (13, 16)), ((31, 40), (27, 32))]
    alignment = align_word_swap(parts.tokenizer, source, edited, spans)
    assert alignment.source_tokens == [5, 6, 9, 10]
    assert alignment.edited_tokens == [5, 8]
    mapper = alignment.mapper
    assert mapper[5, 5] == mapper[6, 5] == 1  # both halves of "magenta" go to "red"
    assert mapper[7, 6] == mapper[8, 7] == 1  # "shirt and" shift back by one
    assert mapper[11, 9] == 1  # "pants" shifts back by two
    assert torch.allclose(mapper.sum(1), torch.ones(len(mapper)))
    assert mapper[:, -2:].sum() == 0  # the edited prompt's last pads have no source


def test_resample_matrix_spreads_intervals():
    assert torch.allclose(resample_matrix(2, 3), torch.tensor([[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]]))


def test_fit_to_model_round_trip(person):
    fitted, box = fit_to_model(person, (16, 32))
    assert fitted.size == (16, 32)
    left, top, right, bottom = box
    assert (right - left, bottom - top) == (14, 32)
    assert np.all(pixels(fitted)[:, :left] == 127)  # padding outside the box
    restored = back_to_crop(fitted, box, person.size)
    assert restored.size == person.size
    smooth = person.resize((9, 20)).resize(person.size)  # a crop without detail finer than the model sees
    round_trip = back_to_crop(fit_to_model(smooth, (16, 32))[0], box, person.size)
    assert np.abs(pixels(round_trip) - pixels(smooth)).mean() < 12


def test_p2p_output_size_and_determinism(parts, person):
    first = edit_p2p(parts, person, SOURCE, EDITED, SPANS, FAST, decode_reconstruction=True)
    second = edit_p2p(parts, person, SOURCE, EDITED, SPANS, FAST)
    assert second.reconstruction is None  # not decoded unless asked for
    assert first.image.size == first.reconstruction.size == first.mask.size == person.size
    assert np.array_equal(pixels(first.image), pixels(second.image))


def test_img2img_output_size_and_seed(parts, person):
    first = edit_img2img(parts, person, EDITED, FAST, seed=1)
    again = edit_img2img(parts, person, EDITED, FAST, seed=1)
    other = edit_img2img(parts, person, EDITED, FAST, seed=2)
    assert first.image.size == person.size
    assert np.array_equal(pixels(first.image), pixels(again.image))
    assert not np.array_equal(pixels(first.image), pixels(other.image))


def test_attention_control_changes_the_edit(parts, person):
    unblended = replace(FAST, blend_threshold=None)
    controlled = edit_p2p(parts, person, SOURCE, EDITED, SPANS, unblended, decode_reconstruction=True)
    # the joint denoising alone
    plain = edit_p2p(parts, person, SOURCE, EDITED, SPANS, replace(NO_CONTROL, blend_threshold=None),
                     decode_reconstruction=True)
    assert np.abs(pixels(controlled.image) - pixels(plain.image)).mean() > 0.5
    # the source branch is never controlled (explicit and fused attention kernels round differently)
    assert np.abs(pixels(controlled.reconstruction) - pixels(plain.reconstruction)).max() <= 1


def test_edit_restores_the_attention_processors(parts, person):
    before = {name: type(p) for name, p in parts.unet.attn_processors.items()}
    edit_p2p(parts, person, SOURCE, EDITED, SPANS, FAST)
    assert {name: type(p) for name, p in parts.unet.attn_processors.items()} == before


def test_batched_edits_match_single_edits(parts, person):
    other = person.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    edits = [
        EditRequest(person, SOURCE, EDITED, SPANS),
        EditRequest(other, "a woman in a green shirt", "a woman in a magenta shirt", [((13, 18), (13, 20))]),
    ]
    batched = edit_p2p_batch(parts, edits, FAST)
    for edit, result in zip(edits, batched):
        single = edit_p2p(parts, edit.image, edit.source_caption, edit.edited_caption, edit.edit_spans, FAST)
        assert np.abs(pixels(single.image) - pixels(result.image)).max() <= 2


def test_local_blend_mask_follows_the_changed_words_attention(parts):
    alignment = align_word_swap(parts.tokenizer, SOURCE, EDITED, SPANS)
    controller = PromptToPromptController([alignment], NO_CONTROL, latent_size=(16, 8))
    tokens = parts.tokenizer.model_max_length
    for height, width in [(16, 8), (8, 4)]:  # two UNet levels
        probabilities = torch.full((2, 2, height * width, tokens), 1 / tokens)
        region = torch.zeros(height, width, dtype=torch.bool)
        region[height // 4 : height // 2, :] = True  # the garment's rows
        probabilities[:, :, region.flatten(), 5] = 1.0  # "red" and "turqu" are attended to there
        controller.edit_probabilities(probabilities, is_cross=True)
    mask = controller.local_blend_mask()[0, 0]
    assert mask.shape == (16, 8)
    rows = mask.mean(1)
    assert rows[4:8].eq(1).all() and rows[:2].eq(0).all() and rows[11:].eq(0).all()


def test_local_blend_keeps_the_source_latents_outside_the_mask(parts):
    alignment = align_word_swap(parts.tokenizer, SOURCE, EDITED, SPANS)
    settings = replace(NO_CONTROL, blend_start_fraction=2 / 6)  # from step 2 of 6
    assert settings.blend_start_step == 2
    mask = torch.zeros(1, 1, 16, 8)
    mask[..., 3:9, 2:6] = 1
    controller = PromptToPromptController([alignment, alignment], settings, (16, 8), mask_override=mask)
    latents = torch.randn(4, 4, 16, 8)  # [source 1, edit 1, source 2, edit 2]
    controller.begin_step(1)
    assert torch.equal(controller.blend(latents), latents)  # blending has not started yet
    controller.begin_step(2)
    blended = controller.blend(latents)
    inside = mask.bool().expand(4, 4, 16, 8)
    assert torch.equal(blended[0::2], latents[0::2])
    assert torch.equal(blended[1::2][~inside[1::2]], latents[0::2][~inside[0::2]])
    assert torch.equal(blended[1::2][inside[1::2]], latents[1::2][inside[1::2]])


def test_local_blend_keeps_pixels_outside_the_mask(parts):
    rng = np.random.default_rng(1)
    source = Image.fromarray(rng.integers(0, 256, (32, 16, 3), dtype=np.uint8))  # at model size: no padding
    mask = torch.zeros(1, 1, 16, 8)
    mask[..., :8, :] = 1  # the upper half may change
    blended = edit_p2p(parts, source, SOURCE, EDITED, SPANS, FAST, mask_override=mask, decode_reconstruction=True)
    unblended = edit_p2p(parts, source, SOURCE, EDITED, SPANS, replace(FAST, blend_threshold=None),
                         decode_reconstruction=True)
    change = np.abs(pixels(blended.image) - pixels(blended.reconstruction)).mean(axis=(1, 2))
    unblended_change = np.abs(pixels(unblended.image) - pixels(unblended.reconstruction)).mean(axis=(1, 2))
    inside, outside = change[:12].mean(), change[20:].mean()  # rows away from the mask's edge
    # the latents outside the mask end equal to the source's, but the decoder's convolutions and group
    # norms let the inside change leak a little into every pixel
    assert outside < 0.5 * inside
    assert outside < 0.5 * unblended_change[20:].mean()
    assert np.array_equal(np.asarray(blended.mask)[:16] > 127, np.ones((16, 16), dtype=bool))


def test_ddim_inversion_is_exact_when_the_noise_ignores_the_latent(model_dir):
    """With a latent-independent noise prediction DDIM inversion is exact, so any error is in the schedules."""
    parts = load_generator(model_dir)
    parts.unet.conv_out.weight.data.zero_()  # noise = the output bias, whatever the latent
    latents = torch.randn(1, 4, 16, 8, generator=torch.Generator().manual_seed(0))
    text = parts.encode_prompts([SOURCE])
    inversion = invert(parts, latents, text, replace(FAST, num_steps=10, guidance=1))
    assert len(inversion.trajectory) == 11
    reconstruction = denoise(parts, inversion.start_latents, text, text, num_steps=10, guidance=1)
    assert torch.allclose(reconstruction, latents, atol=1e-4)


def test_null_text_optimisation_reduces_the_reconstruction_error(parts):
    latents = torch.randn(1, 4, 16, 8, generator=torch.Generator().manual_seed(0))
    text = parts.encode_prompts([SOURCE])

    def reconstruction_error(null_text_steps: int) -> float:
        method = "null-text" if null_text_steps else "ddim"
        settings = replace(FAST, num_steps=5, guidance=4.0, inversion=method, null_text_steps=null_text_steps)
        inversion = invert(parts, latents, text, settings)
        nulls = inversion.null_embeddings or parts.encode_prompts([""])
        reconstruction = denoise(parts, inversion.start_latents, text, nulls, num_steps=5, guidance=4.0)
        return (reconstruction - latents).pow(2).mean().item()

    assert reconstruction_error(10) < 0.8 * reconstruction_error(0)


def test_a_canvas_sets_the_latent_size_the_unet_sees(model_dir, person):
    from pipeline.pdg.cost import count_unet

    wide = load_generator(model_dir, canvas=(24, 40))
    assert wide.image_size == (24, 40)
    with count_unet(wide) as count:
        result = edit_p2p(wide, person, SOURCE, EDITED, SPANS, FAST)
    assert count.latent_sizes == {(20, 12)}  # the canvas over the VAE's factor 2, not the sample size (16, 8)
    assert result.image.size == result.mask.size == person.size
    with pytest.raises(ValueError, match="multiple"):
        load_generator(model_dir, canvas=(25, 40))


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_half_precision_loads_and_edits_on_the_cpu(model_dir, person, precision):
    half = load_generator(model_dir, dtype=precision)
    assert half.unet.dtype == half.text_encoder.dtype == getattr(torch, precision)
    assert half.vae.dtype == torch.float32  # SD's VAE overflows in float16: it stays float32
    assert half.encode_prompts([SOURCE]).dtype == torch.float32
    null_text = replace(FAST, inversion="null-text", null_text_steps=2)
    result = edit_p2p(half, person, SOURCE, EDITED, SPANS, null_text)
    full = edit_p2p(load_generator(model_dir), person, SOURCE, EDITED, SPANS, null_text)
    assert result.image.size == person.size
    assert np.abs(pixels(result.image) - pixels(full.image)).mean() < 10  # rounding, not a different image


def test_negative_prompt_inversion_reconstructs_better_than_plain_ddim(parts):
    latents = torch.randn(1, 4, 16, 8, generator=torch.Generator().manual_seed(0))
    text = parts.encode_prompts([SOURCE])

    def reconstruction_error(method: str) -> float:
        inversion = invert(parts, latents, text, replace(FAST, num_steps=5, guidance=7.5, inversion=method))
        nulls = parts.encode_prompts([""]) if inversion.null_embeddings is None else inversion.null_embeddings
        reconstruction = denoise(parts, inversion.start_latents, text, nulls, num_steps=5, guidance=7.5)
        return (reconstruction - latents).pow(2).mean().item()

    assert reconstruction_error("negative-prompt") < 0.5 * reconstruction_error("ddim")


def test_edits_of_one_source_share_its_inversion_and_source_branch(parts, person):
    from pipeline.pdg.cost import count_unet

    same_image = person.copy()  # another object with the same content: still one group
    edits = [
        EditRequest(person, SOURCE, EDITED, SPANS),
        EditRequest(same_image, SOURCE, "a man in a green jacket and blue jeans", [((11, 14), (11, 16))]),
        EditRequest(person, "a man in a red shirt", "a man in a pink shirt", [((11, 14), (11, 15))]),
    ]
    for inversion in ("ddim", "negative-prompt"):
        with count_unet(parts) as count:
            shared = edit_p2p_batch(parts, edits, replace(FAST, inversion=inversion), decode_reconstruction=True)
        steps = FAST.num_steps
        assert count.rows == steps * 2 + steps * (2 + 3) * 2  # two groups: 2 inversions, 5 rows of denoising
        for edit, result in zip(edits, shared):
            alone = edit_p2p(parts, edit.image, edit.source_caption, edit.edited_caption, edit.edit_spans,
                             replace(FAST, inversion=inversion), decode_reconstruction=True)
            assert np.abs(pixels(alone.image) - pixels(result.image)).max() <= 2
            assert np.abs(pixels(alone.mask) - pixels(result.mask)).max() == 0
            assert np.abs(pixels(alone.reconstruction) - pixels(result.reconstruction)).max() <= 2
    assert np.array_equal(pixels(shared[0].reconstruction), pixels(shared[1].reconstruction))


def test_local_blend_of_a_group_blends_every_edit_with_its_one_source(parts):
    alignment = align_word_swap(parts.tokenizer, SOURCE, EDITED, SPANS)
    mask = torch.zeros(1, 1, 16, 8)
    mask[..., 3:9, 2:6] = 1
    controller = PromptToPromptController([alignment] * 3, NO_CONTROL, (16, 8), mask_override=mask, groups=[0, 0, 1])
    latents = torch.randn(5, 4, 16, 8)  # [source 1, edit 1a, edit 1b, source 2, edit 2]
    blended = controller.blend(latents)
    outside = ~mask[0].bool().expand(4, 16, 8)
    for edit_row, source_row in [(1, 0), (2, 0), (4, 3)]:
        assert torch.equal(blended[edit_row][outside], latents[source_row][outside])
        assert torch.equal(blended[edit_row][~outside], latents[edit_row][~outside])
    assert torch.equal(blended[[0, 3]], latents[[0, 3]])
    with pytest.raises(ValueError, match="consecutive"):
        PromptToPromptController([alignment] * 3, NO_CONTROL, (16, 8), groups=[0, 1, 0])


def test_settings_from_the_default_params_carry_params_yaml_values():
    import yaml

    from pipeline.core.config import load_params

    path = Path(__file__).resolve().parents[1] / "params.yaml"
    pdg = yaml.safe_load(path.read_text())["pdg"]
    settings = EditSettings.from_config(load_params(path).pdg)
    for name in ("num_steps", "guidance", "inversion", "null_text_steps", "cross_replace_fraction",
                 "self_replace_fraction", "blend_start_fraction", "reweight", "strength"):
        assert getattr(settings, name) == pdg[name], name
    assert settings.blend_threshold == (pdg["blend_threshold"] or None)
    assert settings.cross_replace_steps == round(pdg["cross_replace_fraction"] * pdg["num_steps"])
    with pytest.raises(FrozenInstanceError):
        settings.num_steps = 50


def test_settings_reject_an_unknown_or_incomplete_inversion():
    with pytest.raises(ValueError, match="unknown inversion"):
        replace(FAST, inversion="plain")
    with pytest.raises(ValueError, match="null_text_steps"):
        replace(FAST, inversion="null-text", null_text_steps=0)
