"""Ground truth from the renderer, the oracle generator, and the filter that calibrates itself."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.config import FilterConfig, PdgConfig
from pipeline.data.canonical import manifest_path, read_manifest
from pipeline.data.synthpedes import COLOR_RGB
from pipeline.data.synthpedes.truth import KNOWN_BAD, Source, changed_region, edit_target, known_bad, true_edit
from pipeline.pdg.calibration import calibrate, real_pairs
from pipeline.pdg.filtering import filter_pairs, judge
from pipeline.pdg.generate import plan_generation
from pipeline.pdg.oracle import oracle_editor, oracle_plan
from pipeline.pdg.shards import load_source_images
from pipeline.text.lexicon import PALETTE, palette_name


def _train(prepared):
    rows = read_manifest(manifest_path(prepared, "train"))
    return rows, load_source_images(prepared, {row.key for row in rows})


def _decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _truths(rows, count=None):
    """The true edits of the generate stage's plan over `rows` (one edit per source)."""
    plan = plan_generation(rows, PdgConfig(source_count=count or len(rows), num_samples=1))
    found = [(job, true_edit(Source.of(job.source, 0), [c.to_json() for c in job.edit.changes])) for job in plan.jobs]
    return plan, found


def test_a_source_re_renders_exactly_and_its_true_edit_recolours_only_the_item(prepared):
    rows, images = _train(prepared)
    for row in rows:
        assert not changed_region(Source.of(row, seed=0).render(), _decoded(images[row.key])).any()
    assert changed_region(Source.of(rows[0], seed=1).render(), _decoded(images[rows[0].key])).any()
    plan, found = _truths(rows)
    edits = [edit for _, (edit, _) in found if edit is not None]
    assert len(edits) >= 0.9 * len(plan.jobs) >= 20
    for (job, (edit, _)) in found:
        if edit is None:
            continue
        before, after = (np.asarray(im, dtype=np.float32) for im in (edit.source.render(), edit.image))
        assert np.array_equal(before[~edit.region], after[~edit.region])  # nothing else moved
        new = np.array(COLOR_RGB[edit.new_colour])  # the item moved toward its new colour
        assert np.linalg.norm(after[edit.region].mean(0) - new) < np.linalg.norm(before[edit.region].mean(0) - new)
        assert edit.new_colour == palette_name(job.edit.changes[0].new_color)


def test_each_known_bad_pair_is_the_mistake_it_names(prepared):
    rows, _ = _train(prepared)
    _, found = _truths(rows)
    edits = [edit for _, (edit, _) in found if edit is not None]
    others = [Source.of(row, 0) for row in rows]
    rng = np.random.default_rng(0)
    counts = dict.fromkeys(KNOWN_BAD, 0)
    for edit in edits:
        source = np.asarray(edit.source.render())
        for kind in KNOWN_BAD:
            image = known_bad(kind, edit, rng, others)
            if image is None:
                continue
            counts[kind] += 1
            pixels = np.asarray(image)
            assert pixels.shape == source.shape
            changed = changed_region(image, edit.source.render())
            if kind == "unchanged":
                assert not changed.any()
            elif kind == "wrong_colour":  # the edited item, in a third colour (its edge pixels may blend
                # into another colour's exactly, so the two regions differ by a few pixels)
                assert changed.any() and (changed & ~edit.region).sum() <= 0.2 * edit.region.sum() + 2
                assert changed_region(image, edit.image)[edit.region].any()
            elif kind == "wrong_garment":  # another item recoloured, the edited one not
                assert (changed & ~edit.region).any() and not changed[edit.region].all()
            elif kind == "blank":
                assert pixels.std(axis=(0, 1)).max() == 0
            elif kind == "noise":
                assert pixels.std() > 60
            else:
                assert changed.mean() > 0.3  # another person, pose and background
    assert all(counts[kind] == len(edits) for kind in KNOWN_BAD if kind != "wrong_garment")
    assert counts["wrong_garment"] >= 0.8 * len(edits)
    with pytest.raises(ValueError, match="unknown kind"):
        known_bad("blurred", edits[0], rng, others)


def test_the_item_of_a_caption_change_is_what_the_attributes_confirm():
    attributes = {"upper_color": "white", "upper_pattern_color": "black", "lower_color": "gray", "shoe_color": "beige",
                  "bag_color": "pink", "headwear_color": "none", "hair_color": "black"}

    def target(phrase, old):
        return edit_target({"phrase_before": phrase, "old_color": old}, attributes)

    assert target("a white zip-up jacket", "white") == ("upper_color", "")
    assert target("black stripes", "black") == ("upper_pattern_color", "")
    assert target("a backpack with pink straps", "pink") == ("bag_color", "")
    assert target("grey slacks", "grey") == ("lower_color", "")
    assert target("red and beige shoes", "red") == (None, "old_colour_not_the_items")  # a parser slip
    assert target("a red thing", "red") == (None, "no_single_item")


def test_the_oracle_writes_each_planned_edit_s_truth_and_refuses_another_seed(prepared):
    rows, images = _train(prepared)
    plan = plan_generation(rows, PdgConfig(source_count=12, num_samples=2))
    oracle = oracle_plan(plan, seed=0)
    assert len(oracle.jobs) + oracle.edits_not_renderable == len(plan.jobs) and oracle.jobs
    assert {job.key for job in oracle.jobs} <= {job.key for job in plan.jobs}
    sources = [_decoded(images[job.source.key]) for job in oracle.jobs]
    results = oracle_editor(seed=0)(oracle.jobs, sources)
    for job, result in zip(oracle.jobs, results):
        truth, _ = true_edit(Source.of(job.source, 0), [c.to_json() for c in job.edit.changes])
        assert not changed_region(result.image, truth.image).any()
        assert np.array_equal(np.asarray(result.mask) > 0, truth.region)
    with pytest.raises(ValueError, match="does not re-render to its prepared image"):
        oracle_editor(seed=1)(oracle.jobs[:1], sources[:1])
    foreign = [job.source.__class__(**{**vars(job.source), "attributes": ""}) for job in plan.jobs[:1]]
    with pytest.raises(ValueError, match="synthpedes only"):
        Source.of(foreign[0], 0)


class PaletteScorer:
    """Images by their share of pixels nearest each palette colour, captions by the palette colours they
    name: its cosine sees which colours a picture shows."""

    rgb = np.array([COLOR_RGB[name] for name in PALETTE], dtype=np.float32)

    def embed_images(self, images):
        rows = []
        for image in images:
            pixels = np.asarray(image, dtype=np.float32).reshape(-1, 1, 3)
            nearest = np.linalg.norm(pixels - self.rgb[None], axis=2).argmin(axis=1)
            rows.append(np.bincount(nearest, minlength=len(PALETTE)) + 1.0)
        return torch.nn.functional.normalize(torch.tensor(np.array(rows)), dim=-1)

    def embed_texts(self, texts):
        rows = [[1.0 + sum(palette_name(w.strip(".,")) == c for w in t.lower().split()) for c in PALETTE] for t in texts]
        return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)


class Narrowed:
    """Another scorer's cosines, narrowed as a lower temperature narrows them: cos' = a * cos + (1 - a)
    (each embedding gains a shared unit component)."""

    def __init__(self, scorer, a):
        self.scorer, self.a = scorer, a

    def _narrow(self, embeddings):
        shared = torch.full((embeddings.shape[0], 1), (1 - self.a) ** 0.5, dtype=embeddings.dtype)
        return torch.cat([embeddings * self.a ** 0.5, shared], dim=1)

    def embed_images(self, images):
        return self._narrow(self.scorer.embed_images(images))

    def embed_texts(self, texts):
        return self._narrow(self.scorer.embed_texts(texts))


def _generated(found, kinds, others):
    """Generated samples (as the generate stage writes them) of the true edits and known-bad images."""
    import json

    rng, samples = np.random.default_rng(0), []
    for job, (edit, _) in found:
        if edit is None:
            continue
        images = {"true": edit.image, **{kind: known_bad(kind, edit, rng, others) for kind in kinds}}
        for kind, image in images.items():
            record = {"source_key": job.source.key, "source_caption": job.edit.source,
                      "edited_caption": job.edit.edited}
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            samples.append({"__key__": f"{kind}-{job.key}", "png": buffer.getvalue(),
                            "json": json.dumps(record).encode()})
    return samples


def test_two_scorers_at_different_cosine_scales_keep_the_same_pairs(prepared):
    rows, images = _train(prepared)
    _, found = _truths(rows)
    samples = _generated(found, ("unchanged", "wrong_colour"), [Source.of(row, 0) for row in rows])
    cfg = FilterConfig(margin_level=0.2, similarity_level=0.05, calibration_pairs=200)
    real = real_pairs(rows, cfg.calibration_pairs)
    assert len(real) >= 20 and real == real_pairs(rows, cfg.calibration_pairs)  # seeded
    kept, margins = {}, {}
    for name, scorer in (("wide", PaletteScorer()), ("narrow", Narrowed(PaletteScorer(), 0.1))):
        calibration = calibrate(scorer, real, images, cfg)
        pairs = filter_pairs(samples, images, scorer, cfg, calibration, show_progress=False)
        kept[name] = {p.key for p in pairs if not judge(p, cfg, calibration)}
        margins[name] = np.array([p.scores["margin"] for p in pairs])
        report = calibration.to_json()
        assert report["real_pairs"] == len(real)
        assert report["margin_threshold"] == pytest.approx(np.quantile(calibration.preference, 0.2), abs=1e-5)
    assert margins["narrow"] == pytest.approx(0.1 * margins["wide"], abs=1e-5)
    assert kept["wide"] == kept["narrow"]  # the same pairs, though the cosines differ tenfold
    # an absolute threshold, as the filter had (0.02), keeps very different shares of the same pairs
    absolute = {name: (m >= 0.02).mean() for name, m in margins.items()}
    assert absolute["wide"] - absolute["narrow"] > 0.1
    # and the calibrated filter keeps true edits far more often than unchanged or wrongly coloured images
    share = {kind: np.mean([key in kept["wide"] for key in (s["__key__"] for s in samples) if key.startswith(kind)])
             for kind in ("true", "unchanged", "wrong_colour")}
    assert share["true"] > share["unchanged"] + 0.3 and share["true"] > share["wrong_colour"] + 0.3


def test_captions_without_a_colour_leave_nothing_to_calibrate_on(prepared):
    rows, images = _train(prepared)
    colourless = [row.__class__(**{**vars(row), "captions": ["a person walking"]}) for row in rows]
    assert real_pairs(colourless, 100) == []
    with pytest.raises(ValueError, match="no training caption with an editable colour phrase"):
        calibrate(PaletteScorer(), [], images, FilterConfig())
