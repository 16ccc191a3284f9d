"""The cost of proximity data generation: the UNet-evaluation formula equals the hook's count."""

from dataclasses import replace

import pytest

from pipeline.core.config import PdgConfig
from pipeline.data.canonical import manifest_path, read_manifest
from pipeline.pdg.cost import count_unet, plan_unet_evaluations, unet_evaluations
from pipeline.pdg.generate import (
    alignable_with,
    edit_batches,
    job_groups,
    make_editor,
    plan_generation,
    run_generation,
)
from pipeline.pdg.shards import load_source_images
from pipeline.run_folder import reuse_or_start
from pipeline.generator.model import load_generator
from tiny_generator import build_tiny_generator

CFG = PdgConfig(source_count=4, num_samples=2, num_steps=3, batch_size=3, shard_size=5, sheet_samples=0)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return load_generator(build_tiny_generator(tmp_path_factory.mktemp("generator") / "sd", max_tokens=77))


def _plan(prepared, parts, cfg):
    return plan_generation(read_manifest(manifest_path(prepared, "train")), cfg, alignable_with(parts.tokenizer))


def _measured(prepared, parts, cfg, out_dir) -> int:
    plan = _plan(prepared, parts, cfg)
    reuse_or_start(out_dir, {"test": True})
    images = load_source_images(prepared, {job.source.key for job in plan.jobs})
    with count_unet(parts) as count:
        run_generation(plan, images, make_editor(parts, cfg), cfg, "tiny", out_dir)
    return count.rows


@pytest.mark.parametrize("setting", [
    dict(num_samples=1),
    dict(num_samples=2),
    dict(num_samples=2, inversion="negative-prompt"),
    dict(num_samples=1, inversion="negative-prompt", batch_size=2),
    dict(num_samples=2, guidance=1.0),
    dict(num_samples=1, method="img2img"),
    dict(num_samples=2, method="img2img", strength=0.5),
])
def test_the_formula_equals_the_counted_unet_evaluations(prepared, parts, tmp_path, setting):
    cfg = replace(CFG, **setting)
    plan = _plan(prepared, parts, cfg)
    assert len(plan.jobs) > 2
    assert _measured(prepared, parts, cfg, tmp_path) == plan_unet_evaluations(plan, cfg)


def test_the_null_text_formula_is_an_upper_bound(prepared, parts, tmp_path):
    cfg = replace(CFG, inversion="null-text", null_text_steps=3)
    plan = _plan(prepared, parts, cfg)
    measured = _measured(prepared, parts, cfg, tmp_path)
    # the early stop may end each step's Adam loop after one iteration, never before
    assert plan_unet_evaluations(plan, replace(cfg, null_text_steps=1)) <= measured <= plan_unet_evaluations(plan, cfg)


def test_batches_are_cut_at_group_boundaries(prepared, parts):
    plan = _plan(prepared, parts, replace(CFG, source_count=8))
    keys = [(job.source.key, job.caption_index) for job in plan.jobs]
    for batch_size in (1, 2, 3, 5):
        batches = edit_batches(plan.jobs, batch_size)
        assert [job for batch in batches for job in batch] == plan.jobs
        assert all(1 <= len(batch) <= batch_size for batch in batches)
        if batch_size >= 2:  # groups have at most 2 jobs: none is split
            assert sum(len(job_groups(batch)) for batch in batches) == len(set(keys))


def test_cost_per_job_of_the_default_and_the_real_profile():
    default = PdgConfig()  # p2p, ddim, K = 2, T = 20, guidance 4
    # before sharing: per job T (inversion) + 2T x 2 (source and edited rows, guided) = 100
    assert unet_evaluations(default, sources=1) == 20 + 20 * 3 * 2 == 2 * 70
    real = PdgConfig(num_steps=50, guidance=7.5, inversion="negative-prompt", canvas_height=512, canvas_width=192)
    assert unet_evaluations(real, sources=1) == 50 + 50 * 3 * 2 == 2 * 175  # before: 250 per job
    assert unet_evaluations(replace(default, method="img2img"), sources=1) == 2 * 12 * 2
    assert unet_evaluations(replace(real, inversion="null-text", null_text_steps=10), sources=1) == 350 + 50 * 12
