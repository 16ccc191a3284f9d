"""The filter and caption stages' libraries: scores, decisions, duplicates, identities, texts, output."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.config import CaptionConfig, FilterConfig
from pipeline.data.canonical import iter_shard_samples, list_shards, manifest_path, read_manifest, write_tar_atomic
from pipeline.pdg.captioning import (
    ImageCaptioner,
    assign_identities,
    contradicts_edit,
    garment_key,
    paraphrases,
    proximity_rows,
    write_training_set,
)
from pipeline.pdg.crops import GREY, pad_to_square
from pipeline.models import NoTrainedModel
from pipeline.pdg.scorers import ClipScorer, NoSuchCheckpoint, check_clip_checkpoint, dual_encoder_folder, load_scorer
from pipeline.pdg.filtering import (
    ScoredPair,
    filter_pairs,
    noise_share,
    outside_change,
    pixel_std,
    read_generated,
    summarise,
    write_kept,
)
from tiny_project import TINY_PROFILE, fixed_calibration


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _person(colour=(200, 30, 30)) -> np.ndarray:
    """A 64x32 crop: grey background, a coloured torso block, dark legs."""
    image = np.full((64, 32, 3), 120, dtype=np.float32)
    image[14:34, 8:24] = colour
    image[34:58, 10:22] = (40, 40, 60)
    return image


def test_pixel_statistics_separate_blank_noise_and_edits():
    rng = np.random.default_rng(0)
    source = Image.fromarray(_person().astype(np.uint8))
    edited = Image.fromarray(_person((30, 200, 30)).astype(np.uint8))
    assert pixel_std(Image.new("RGB", (32, 64), (128, 128, 128))) == 0.0
    assert pixel_std(Image.new("RGB", (32, 64), (200, 30, 35))) == 0.0  # flat and coloured: blank too
    assert pixel_std(source) > 20
    assert noise_share(Image.fromarray(rng.integers(0, 256, (64, 32, 3)).astype(np.uint8))) > 0.7
    assert noise_share(source) < 0.15
    # the torso (320 of 2048 pixels) is inside the 30% allowed to change: nothing outside moved
    assert outside_change(edited, source) == 0.0
    shifted = Image.fromarray(np.clip(_person((30, 200, 30)) + 20, 0, 255).astype(np.uint8))
    assert outside_change(shifted, source) == pytest.approx(20.0)


class _ColourScorer:
    """Embeds an image by its torso colour and a caption by the colour word it names."""

    colours = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}

    def embed_images(self, images):
        rows = [np.asarray(image, dtype=np.float32)[14:34, 8:24].mean(axis=(0, 1)) for image in images]
        return torch.nn.functional.normalize(torch.tensor(np.array(rows)) + 1e-3, dim=-1)

    def embed_texts(self, texts):
        rows = [next(v for k, v in self.colours.items() if k in t) for t in texts]
        return torch.tensor(rows)


def _generated_shard(tmp_path):
    """Five generated pairs from one red source: a good edit, its near copy, a wrong colour, a blank
    image and noise."""
    rng = np.random.default_rng(1)
    good = _person((30, 200, 30))
    images = {"good": good, "copy": good + 0.4, "wrong": _person((200, 30, 30)),
              "blank": np.full((64, 32, 3), 90.0), "noise": rng.integers(0, 256, (64, 32, 3))}
    samples = []
    for key, array in images.items():
        record = {"source_key": "src", "source_person_id": 3, "source_caption": "a man in a red shirt",
                  "edited_caption": "a man in a green shirt", "method": "p2p",
                  "changes": [{"phrase_before": "red shirt", "phrase_after": "green shirt", "new_color": "green"}]}
        samples.append({"__key__": key, "png": _png(array), "json": json.dumps(record).encode()})
    write_tar_atomic(tmp_path / "pdg-000000.tar", samples)
    return [str(tmp_path / "pdg-000000.tar")], {"src": _png(_person())}


def test_filter_rejects_each_bad_pair_for_its_reason_and_reports_counts(tmp_path):
    shards, sources = _generated_shard(tmp_path)
    cfg, calibration = FilterConfig(duplicate_change=1.0, batch_size=2), fixed_calibration(0.05, 0.5)
    pairs = filter_pairs(read_generated(shards), sources, _ColourScorer(), cfg, calibration, show_progress=False)
    verdict = {p.key: p.reasons for p in pairs}
    assert verdict["good"] == [] and verdict["copy"] == ["duplicate"]
    assert "consistency_margin" in verdict["wrong"] and "consistency_similarity" in verdict["wrong"]
    assert "blank" in verdict["blank"] and "noise" in verdict["noise"]
    report = summarise(pairs, enabled=True, calibration=calibration).to_json()
    assert report["pairs_in"] == 5 and report["kept"] == 1 and report["acceptance_rate"] == 0.2
    assert report["failed_by_reason"]["duplicate"] == 1 and report["failed_by_reason"]["blank"] == 1
    assert write_kept(pairs, tmp_path / "kept", shard_size=4) == 1
    (kept,) = iter_shard_samples(sorted(str(p) for p in (tmp_path / "kept").glob("pdg-*.tar")))
    assert kept["__key__"] == "good" and json.loads(kept["json"])["filter_scores"]["margin"] > 0.05
    assert report["calibration"]["margin_threshold"] == 0.05 and report["calibration"]["similarity_threshold"] == 0.5
    assert summarise(pairs, enabled=False, calibration=calibration).kept == 5
    assert write_kept(pairs, tmp_path / "all", shard_size=4, enabled=False) == 5


def _tiny_clip(folder):
    """A tiny random CLIP with its tokenizer and a 32-pixel image processor, saved in `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from pipeline.generator.caption_tokenizer import train_caption_tokenizer

    tokenizer = train_caption_tokenizer(["a man in a red shirt", "a man in a green shirt"])
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_a_clip_checkpoint_scores_pairs(tmp_path):
    scorer = ClipScorer(str(_tiny_clip(tmp_path / "clip")))
    assert scorer.model.dtype == torch.float32  # on the CPU
    shards, sources = _generated_shard(tmp_path)
    pairs = filter_pairs(read_generated(shards), sources, scorer, FilterConfig(), fixed_calibration(-2.0, -1.0),
                         show_progress=False)
    assert len(pairs) == 5 and all(-1 <= p.scores["edited_similarity"] <= 1 for p in pairs)
    assert len({round(p.scores["edited_similarity"], 6) for p in pairs}) > 1  # images differ, so do scores


def test_the_scorer_is_a_clip_wherever_its_folder_lies_and_a_variant_without_a_model_is_one_line(tmp_path,
                                                                                                   monkeypatch):
    clip = _tiny_clip(tmp_path / "models" / "clip-vit-base-patch16")  # as in `--clip /models/clip-...`
    assert dual_encoder_folder(str(clip)) is None
    assert isinstance(load_scorer(str(clip)), ClipScorer)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "baseline").mkdir()
    with pytest.raises(NoTrainedModel, match=r"no trained model in models/baseline/best: run `dvc repro train@baseline`"):
        dual_encoder_folder("models/baseline")


def _tall_person(head_and_feet):
    """A 96x32 crop: a grey torso band in the middle, the top and bottom quarters in `head_and_feet`."""
    image = np.full((96, 32, 3), 120, dtype=np.uint8)
    image[:24], image[72:] = head_and_feet, head_and_feet
    return Image.fromarray(image)


def test_pad_to_square_centres_the_crop_on_the_fill():
    crop = _tall_person((200, 30, 30))
    square = pad_to_square(crop, (1, 2, 3))
    assert square.size == (96, 96)
    pixels = np.asarray(square)
    assert (pixels[:, :32] == (1, 2, 3)).all() and (pixels[:, 64:] == (1, 2, 3)).all()
    assert (pixels[:, 32:64] == np.asarray(crop)).all()
    wide = pad_to_square(Image.new("RGB", (40, 10), (9, 9, 9)))
    assert wide.size == (40, 40) and wide.getpixel((0, 0)) == GREY and wide.getpixel((20, 20)) == (9, 9, 9)
    assert pad_to_square(Image.new("L", (8, 8))).size == (8, 8)


def test_clip_sees_the_whole_person_crop_not_only_its_waist(tmp_path):
    scorer = ClipScorer(str(_tiny_clip(tmp_path / "clip")))
    red, blue = _tall_person((200, 30, 30)), _tall_person((30, 30, 200))  # other hat and shoes
    # the processor alone centre-crops 32 of the 96 rows: hat and shoes are cut off, both look alike
    unpadded = scorer.processor(images=[red, blue], return_tensors="pt")["pixel_values"]
    assert torch.equal(unpadded[0], unpadded[1])
    padded_values = scorer.pixel_values([red, blue])
    assert padded_values.shape == unpadded.shape and not torch.allclose(padded_values[0], padded_values[1])
    # the padding is the processor's mean colour: it normalises to about zero
    assert scorer.fill == tuple(round(255 * m) for m in scorer.processor.image_mean)
    assert padded_values[:, :, :, 0].abs().max() < 0.03
    assert not torch.allclose(scorer.embed_images([red]), scorer.embed_images([blue]))


def test_a_missing_scorer_folder_is_told_apart_from_a_folder_that_is_not_clip(tmp_path):
    with pytest.raises(NoSuchCheckpoint, match="no such folder"):
        check_clip_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(NoSuchCheckpoint, match="no such folder, and no hub model"):
        check_clip_checkpoint("someone/no-such-clip")  # offline: the local cache only
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a CLIP checkpoint") as raised:
        check_clip_checkpoint(str(tmp_path / "empty"))
    assert not isinstance(raised.value, NoSuchCheckpoint)
    blip = tmp_path / "blip"
    _tiny_captioner(blip)
    with pytest.raises(ValueError, match="'blip' model, not a CLIP checkpoint"):
        check_clip_checkpoint(str(blip))
    assert check_clip_checkpoint(str(_tiny_clip(tmp_path / "clip"))) == str(tmp_path / "clip")


def _stage_params(project, overrides):
    import yaml

    from tiny_project import REPO, deep_merge

    params = deep_merge(deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_PROFILE), overrides)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_filter_stage_names_the_key_and_the_path_of_a_missing_scorer(tmp_path, monkeypatch, caplog):
    import importlib

    from tiny_project import REPO

    monkeypatch.syspath_prepend(str(REPO))
    filter_stage = importlib.import_module("stages.filter")
    _generated_shard(tmp_path / "data" / "pdg" / "raw")
    monkeypatch.chdir(tmp_path)
    from tiny_project import stage_command

    monkeypatch.setattr("sys.argv", ["filter", *stage_command("filter")[3:]])

    def error_line(scorer):
        _stage_params(tmp_path, {"filter": {"scorer": str(scorer)}})
        caplog.clear()
        try:
            assert filter_stage.main() == 1
        except SystemExit as stop:  # the stage's input check, before any work
            assert stop.code == 1
        (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert "'filter.scorer'" in line and str(scorer) in line
        return line

    line = error_line(tmp_path / "no-clip")
    assert "no such folder" in line and "could not be loaded as a CLIP" not in line
    blip = tmp_path / "blip"
    _tiny_captioner(blip)
    assert "'blip' model, not a CLIP checkpoint" in error_line(blip)


def _scored(key, **scores):
    return ScoredPair(key, {"source_key": key}, {}, scores)


def test_the_report_gives_quantiles_of_every_threshold_score():
    pairs = [_scored(f"p{i}", edited_similarity=i / 10, source_similarity=1 - i / 10, margin=float(i),
                     outside_change=10.0 * i, pixel_std=20.0, noise_share=0.1) for i in range(11)]
    pairs[3].reasons = ["fidelity"]  # rejected pairs count too
    report = summarise(pairs, enabled=True, calibration=fixed_calibration(0.0, 0.0)).to_json()
    assert report["pairs_in"] == 11 and report["kept"] == 10 and report["failed_by_reason"]["fidelity"] == 1
    quantiles = report["score_quantiles"]
    assert set(quantiles) == {"edited_similarity", "source_similarity", "margin", "outside_change"}
    assert quantiles["margin"] == {"min": 0.0, "p05": 0.5, "p25": 2.5, "median": 5.0, "p75": 7.5, "p95": 9.5,
                                   "max": 10.0}
    assert quantiles["outside_change"]["p95"] == 95.0 and quantiles["edited_similarity"]["median"] == 0.5
    assert quantiles["source_similarity"]["p05"] == 0.05 and quantiles["source_similarity"]["max"] == 1.0
    assert summarise([], enabled=True, calibration=fixed_calibration(0.0, 0.0)).to_json()["score_quantiles"] == {}


def _kept_sample(key, person, phrase, colour, caption="A man in a red shirt and blue jeans walking.", source="src"):
    """A kept pair whose edit turned `phrase` ("red shirt", "blue jeans") to `colour`."""
    old, garment = phrase.split(" ", 1)
    record = {"source_key": source, "source_person_id": person, "edited_caption": caption.replace(old, colour),
              "method": "p2p", "changes": [{"phrase_before": phrase, "phrase_after": f"{colour} {garment}",
                                            "old_color": old, "new_color": colour}]}
    return {"__key__": key, "png": _png(_person()), "json": json.dumps(record).encode()}


def test_one_edit_of_one_person_is_one_new_identity():
    samples = [_kept_sample("a", 1, "red shirt", "green"), _kept_sample("b", 1, "red shirt", "green"),
               _kept_sample("c", 1, "red shirt", "blue"), _kept_sample("d", 2, "red shirt", "green")]
    ids = assign_identities([json.loads(s["json"]) for s in samples], first_id=100)
    assert ids == [100, 100, 101, 102]


def test_paraphrases_are_distinct_and_reproducible():
    caption = "A man walking toward the camera in a green shirt and blue jeans, carrying a black bag."
    first = paraphrases(caption, 3, 0.2, seed=0, key="k")
    assert len(first) == 3 and len(set(first)) == 3 and caption not in first
    assert first == paraphrases(caption, 3, 0.2, seed=0, key="k")
    assert paraphrases(caption, 0, 0.2, seed=0, key="k") == []


def _tiny_captioner(folder):
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "man", "woman", "red", "green", "shirt", "pants"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = BlipConfig(
        vision_config={**small, "image_size": 32, "patch_size": 8},
        text_config={**small, "vocab_size": len(words), "encoder_hidden_size": 16, "bos_token_id": 2, "eos_token_id": 3,
                     "sep_token_id": 3, "pad_token_id": 0, "max_position_embeddings": 32},
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return ImageCaptioner(str(folder), max_tokens=5)


def test_training_set_holds_original_and_proximity_pairs_with_all_texts(prepared, tmp_path):
    captioner = _tiny_captioner(tmp_path / "blip")
    original = read_manifest(manifest_path(prepared, "train"))
    samples = [_kept_sample("pdg-a", 1, "red shirt", "green", source=original[0].key),
               _kept_sample("pdg-b", 1, "red shirt", "green", source=original[0].key),
               _kept_sample("pdg-c", 2, "blue jeans", "pink", source=original[5].key)]
    first_id = max(r.person_id for r in original) + 1
    rows, machine = proximity_rows(samples, first_id, CaptionConfig(paraphrases=2), captioner)
    assert [r.person_id for r in rows] == [first_id, first_id, first_id + 1]
    # the tiny BLIP says "red shirt a" of every image: that contradicts the edits of the red shirt
    assert captioner([Image.fromarray(_person().astype(np.uint8))]) == ["red shirt a"]
    assert machine == {"machine_captions_added": 1, "machine_captions_dropped_contradicting": 2}
    for row in rows:
        edited = json.loads(next(s for s in samples if s["__key__"] == row.key)["json"])["edited_caption"]
        assert row.captions[0] == edited
        assert len(row.captions) == (4 if row.key == "pdg-c" else 3)  # edited, 2 paraphrases (, machine caption)
    assert rows[2].captions[-1] == "red shirt a"
    counts = write_training_set(prepared, original, samples, rows, tmp_path / "train", shard_size=2)
    assert counts == {"original_images": len(original), "proximity_images": 3, "proximity_identities": 2,
                      "proximity_captions": 10}
    manifest = read_manifest(manifest_path(tmp_path / "train", "train"))
    assert [r.key for r in manifest] == [r.key for r in original] + ["pdg-a", "pdg-b", "pdg-c"]
    read_back = {s["__key__"]: json.loads(s["json"]) for s in iter_shard_samples(list_shards(tmp_path / "train", "train"))}
    assert len(read_back) == len(original) + 3 and read_back["pdg-c"]["person_id"] == first_id + 1
    assert read_back["pdg-c"]["source_key"] == original[5].key  # its provenance
    assert "source_key" not in read_back[original[0].key]


def test_blip_gets_the_person_crop_padded_not_stretched(tmp_path):
    captioner = _tiny_captioner(tmp_path / "blip")
    assert captioner.model.dtype == torch.float32
    crop = _tall_person((200, 30, 30))  # 96x32: stretched 3x sideways without the padding
    pixels = captioner.inputs([crop])["pixel_values"][0]
    stretched = captioner.processor(images=[crop], return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == stretched.shape == (3, 32, 32)
    assert pixels[:, :, :8].abs().max() < 0.03  # the sides are the fill: the processor's mean colour
    assert stretched[:, :, :8].abs().max() > 0.5 and pixels[:, :, 12:20].abs().max() > 0.5


def test_a_machine_caption_giving_the_edited_garment_its_old_colour_is_dropped():
    shirt = [{"phrase_before": "a red T-shirt", "phrase_after": "an orange T-shirt", "old_color": "red",
              "new_color": "orange"}]
    assert contradicts_edit("a man in a red shirt and black pants", shirt)  # t-shirt and shirt: one garment
    assert contradicts_edit("a man whose shirt is dark red", shirt)  # predicative, a shade of the old colour
    assert contradicts_edit("a man in a maroon tee", shirt)  # the old colour's family, a synonym
    assert contradicts_edit("a man in a red and white shirt", shirt)
    assert not contradicts_edit("a man in an orange shirt and red pants", shirt)  # red, but on the pants
    assert not contradicts_edit("a man with a red bag", shirt)
    assert not contradicts_edit("a man walking down the street", shirt)  # no colour said: no contradiction
    two_colours = [{"phrase_before": "navy and red jeans", "phrase_after": "green and red jeans",
                    "old_color": "navy", "new_color": "green"}]
    assert contradicts_edit("a woman in blue jeans", two_colours)  # navy is blue
    assert not contradicts_edit("a woman in red trousers", two_colours)  # red is still on them
    no_old = [{"phrase_before": "white sneakers", "phrase_after": "pink sneakers", "new_color": "pink"}]
    assert contradicts_edit("white shoes", no_old)  # old colour from the phrases; sneakers are shoes
    assert garment_key("Tank Tops") == "top" and garment_key("dresses") == "dress" and garment_key("trousers") == "pant"

    captions = iter(["a man in a red shirt", "a man in an orange shirt", "", "a man in a red shirt"])
    calls = []

    def fake_captioner(images):
        calls.append(len(images))
        return [next(captions) for _ in images]

    samples = [_kept_sample(k, 1, "red shirt", "orange") for k in "abc"] + [_kept_sample("d", 2, "blue jeans", "pink")]
    rows, counts = proximity_rows(samples, 50, CaptionConfig(paraphrases=0, batch_size=3), fake_captioner)
    assert calls == [3, 1]
    assert counts == {"machine_captions_added": 2, "machine_captions_dropped_contradicting": 1}
    assert [r.captions[1:] for r in rows] == [[], ["a man in an orange shirt"], [], ["a man in a red shirt"]]
    assert proximity_rows(samples, 50, CaptionConfig(paraphrases=0))[1] == {
        "machine_captions_added": 0, "machine_captions_dropped_contradicting": 0}
