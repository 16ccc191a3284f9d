"""The `generate` stage's library: planning, shards, determinism, resume, parallel processes."""

import hashlib
import io
import shutil
import json
import os
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from pipeline.core.config import PdgConfig
from pipeline.data.canonical import iter_shard_samples, manifest_path, read_manifest
from pipeline.pdg.generate import (
    alignable_with,
    generation_fingerprint,
    make_editor,
    plan_generation,
    run_generation,
    select_sources,
    wait_for_shards,
)
from pipeline.pdg.shards import load_source_images
from pipeline.run_folder import reuse_or_start
from pipeline.generator.model import load_generator
from tiny_generator import build_tiny_generator
from tiny_project import make_tiny_project, stage_command

CFG = PdgConfig(source_count=6, num_samples=2, num_steps=4, batch_size=3, shard_size=4, sheet_samples=4)


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    return str(build_tiny_generator(tmp_path_factory.mktemp("generator") / "sd", max_tokens=77))


@pytest.fixture(scope="module")
def parts(generator):
    return load_generator(generator)


def _train_rows(prepared):
    return read_manifest(manifest_path(prepared, "train"))


def _run(prepared, parts, generator, out_dir, cfg=CFG, rank=0, world=1, edit=None):
    plan = plan_generation(_train_rows(prepared), cfg, alignable_with(parts.tokenizer))
    reuse_or_start(out_dir, generation_fingerprint(cfg, generator, []))
    images = load_source_images(prepared, {job.source.key for job in plan.jobs})
    return plan, run_generation(plan, images, edit or make_editor(parts, cfg), cfg, generator, out_dir, rank, world)


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob("pdg-*.tar"))}


def test_sources_come_from_the_training_split_only(prepared):
    rows = _train_rows(prepared)
    picked = select_sources(rows, CFG)
    assert len(picked) == 6 and all(row.split == "train" for row in picked)
    assert select_sources(rows, CFG) == picked  # seeded
    val_row = read_manifest(manifest_path(prepared, "val"))[0]
    with pytest.raises(ValueError, match="train split only"):
        select_sources(rows + [val_row], CFG)
    everything = select_sources(rows, replace(CFG, source_count=0, source_fraction=0.5))
    assert len(everything) == round(0.5 * len(rows))


def test_plan_has_distinct_edits_of_real_colour_phrases(prepared, parts):
    plan = plan_generation(_train_rows(prepared), CFG, alignable_with(parts.tokenizer))
    assert plan.sources == 6 and 0 < len(plan.jobs) <= 12
    assert len({job.key for job in plan.jobs}) == len(plan.jobs)
    for job in plan.jobs:
        assert job.edit.source == job.source.captions[job.caption_index]
        change = job.edit.changes[0]
        assert change.old_color != change.new_color and change.new_color in job.edit.edited


@pytest.mark.parametrize("method", ["p2p", "img2img"])
def test_shards_read_back_with_every_field_and_are_deterministic(prepared, parts, generator, tmp_path, method):
    cfg = replace(CFG, method=method)
    plan, report = _run(prepared, parts, generator, tmp_path / "a", cfg)
    samples = list(iter_shard_samples(sorted(str(p) for p in (tmp_path / "a").glob("pdg-*.tar"))))
    assert [s["__key__"] for s in samples] == [job.key for job in plan.jobs]
    assert report.samples_written == len(plan.jobs) and report.shards_written == -(-len(plan.jobs) // 4)
    for sample, job in zip(samples, plan.jobs):
        record = json.loads(sample["json"])
        assert record["source_key"] == job.source.key and record["source_person_id"] == job.source.person_id
        assert record["edited_caption"] == job.edit.edited and record["method"] == method
        assert record["params"]["num_steps"] == 4 and record["seed"] == job.seed and record["changes"]
        assert Image.open(io.BytesIO(sample["png"])).size == (job.source.width, job.source.height)
        assert ("mask.png" in sample) == (method == "p2p")
    _run(prepared, parts, generator, tmp_path / "b", cfg)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")


def test_a_crash_leaves_only_complete_shards_and_the_rerun_completes_them(prepared, parts, generator, tmp_path):
    _run(prepared, parts, generator, tmp_path / "straight")
    editor = make_editor(parts, CFG)
    calls = []

    def crashing(jobs, sources):
        calls.append(len(jobs))
        if len(calls) == 3:  # in the middle of the second shard
            raise KeyboardInterrupt("killed")
        return editor(jobs, sources)

    with pytest.raises(KeyboardInterrupt):
        _run(prepared, parts, generator, tmp_path / "resumed", edit=crashing)
    assert list(_digests(tmp_path / "resumed")) == ["pdg-000000.tar"]  # never a half shard
    assert not list((tmp_path / "resumed").glob(".*.tmp-*"))
    _, report = _run(prepared, parts, generator, tmp_path / "resumed")
    assert report.shards_reused == 1
    assert _digests(tmp_path / "resumed") == _digests(tmp_path / "straight")


def test_two_processes_write_disjoint_shards_whose_union_is_the_one_process_output(prepared, parts, generator, tmp_path):
    _run(prepared, parts, generator, tmp_path / "one")
    _, first = _run(prepared, parts, generator, tmp_path / "two", rank=0, world=2)
    _, second = _run(prepared, parts, generator, tmp_path / "two", rank=1, world=2)
    assert first.shards_written + second.shards_written == len(_digests(tmp_path / "one"))
    assert first.shards_written and second.shards_written
    assert _digests(tmp_path / "two") == _digests(tmp_path / "one")


def test_a_changed_configuration_starts_afresh(prepared, parts, generator, tmp_path):
    _run(prepared, parts, generator, tmp_path)
    before = _digests(tmp_path)
    _run(prepared, parts, generator, tmp_path, cfg=replace(CFG, guidance=2.0))
    after = _digests(tmp_path)
    assert before.keys() == after.keys() and before != after


def test_a_changed_batch_size_keeps_the_finished_shards(prepared, parts, generator, tmp_path):
    _run(prepared, parts, generator, tmp_path)
    before = _digests(tmp_path)
    _, report = _run(prepared, parts, generator, tmp_path, cfg=replace(CFG, batch_size=5))
    assert report.shards_reused == len(before) and report.shards_written == 0
    assert _digests(tmp_path) == before
    fingerprint = generation_fingerprint(CFG, generator, [])
    assert generation_fingerprint(replace(CFG, batch_size=5, sheet_samples=0), generator, []) == fingerprint
    assert generation_fingerprint(replace(CFG, precision="bfloat16"), generator, []) != fingerprint


def test_the_generation_fingerprint_sees_source_contents_and_code(generator, tmp_path, monkeypatch):
    import pipeline.pdg.generate as generate_module

    manifest = tmp_path / "train.jsonl"
    manifest.write_text('{"caption": "a red jacket"}\n')
    base = generation_fingerprint(CFG, generator, [manifest])
    manifest.write_text('{"caption": "a tan jacket"}\n')  # same size, other source text
    assert generation_fingerprint(CFG, generator, [manifest]) != base
    edited = generation_fingerprint(CFG, generator, [manifest])
    monkeypatch.setattr(generate_module, "code_digest", lambda entry: "other code")
    assert generation_fingerprint(CFG, generator, [manifest]) != edited


def test_wait_for_shards_returns_once_every_shard_exists(tmp_path):
    names = ["pdg-000000.tar", "pdg-000001.tar"]
    (tmp_path / names[0]).write_bytes(b"done")
    with pytest.raises(TimeoutError, match="1 of 2"):
        wait_for_shards(tmp_path, names, poll_s=0.01, timeout_s=0.05)
    late = threading.Timer(0.2, lambda: (tmp_path / names[1]).write_bytes(b"done"))
    late.start()
    started = time.monotonic()
    wait_for_shards(tmp_path, names, poll_s=0.02, timeout_s=10)
    assert 0.15 < time.monotonic() - started < 5
    late.join()


@pytest.mark.slow  # a stage in a subprocess or several processes: seconds, not milliseconds
def test_generate_stage_writes_metrics_and_sample_sheet(tmp_path, generator):
    overrides = {"pdg": {"source_count": 4, "num_samples": 1, "num_steps": 3, "batch_size": 2, "shard_size": 2,
                         "sheet_samples": 3}}
    project = make_tiny_project(tmp_path, overrides)
    subprocess.run(stage_command("prepare"), cwd=project, check=True, capture_output=True)
    (project / "models").mkdir()
    shutil.copytree(generator, project / "models" / "generator")
    result = subprocess.run(stage_command("generate"), cwd=project, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((project / "metrics" / "generate.json").read_text())
    timing = json.loads((project / "reports" / "pdg" / "timing.json").read_text())
    assert metrics["sources"] == 4 and metrics["samples"] >= 1 and timing["samples_per_s"] > 0
    # ddim: the formula is exact; 3 steps, guidance 4, one edit per source caption: 3 + 3 * 2 * 2 rows a job
    assert metrics["unet_evaluations"] == timing["unet_evaluations_planned"] == timing["unet_evaluations_measured"] \
        == 15 * metrics["samples"]
    assert timing["unet_evaluations_per_s"] > 0 and timing["estimated_hours_at_measured_rate"] > 0
    assert timing["processes"] == 1 and timing["shards_reused"] == 0
    assert not any(key.endswith(("_per_s", "_seconds")) or key == "processes" for key in metrics)
    assert "UNet evaluations, about" in result.stderr and "limit it with pdg.source_count" in result.stderr
    assert (project / "reports" / "pdg" / "sample_sheet.png").stat().st_size > 5000
    assert (project / "data" / "pdg" / "raw" / "pdg-000000.tar").is_file()


@pytest.mark.slow  # two generate stages in subprocesses
def test_generate_killed_by_sigkill_reruns_to_the_uninterrupted_output(tmp_path, generator):
    import signal

    overrides = {"pdg": {"source_count": 8, "num_samples": 1, "num_steps": 3, "batch_size": 2, "shard_size": 2,
                         "sheet_samples": 3}}
    projects = {}
    for name in ("straight", "killed"):
        project = projects[name] = make_tiny_project(tmp_path / name, overrides)
        subprocess.run(stage_command("prepare"), cwd=project, check=True, capture_output=True)
        (project / "models").mkdir()
        shutil.copytree(generator, project / "models" / "generator")
    straight = subprocess.run(stage_command("generate"), cwd=projects["straight"], capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = _digests(projects["straight"] / "data" / "pdg" / "raw")
    assert len(expected) >= 3

    raw = projects["killed"] / "data" / "pdg" / "raw"
    process = subprocess.Popen(stage_command("generate"), cwd=projects["killed"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (raw / "pdg-000000.tar").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)  # after the first shard, before the last
    assert process.wait() == -signal.SIGKILL
    finished = _digests(raw)
    assert 1 <= len(finished) < len(expected)
    assert all(expected[name] == digest for name, digest in finished.items())  # never a half shard
    rerun = subprocess.run(stage_command("generate"), cwd=projects["killed"], capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"({len(finished)} reused)" in rerun.stderr
    assert _digests(raw) == expected
    assert not list(raw.glob(".*.tmp-*"))
