"""A broken output of an earlier stage names itself: the file, and the stage that rewrites it."""

from __future__ import annotations

import shutil

import pytest

from pipeline.data.canonical import iter_shard_samples, list_shards
from pipeline.generator.checkpoint import resolve_generator
from pipeline.core.io import BrokenArtifact
from pipeline.models import DualEncoder
from tiny_project import make_tiny_project, stage_command


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_truncated_or_empty_shard_is_one_line_naming_it(prepared, tmp_path, damage):
    shard = tmp_path / "data" / "prepared" / "shards" / "train-000000.tar"
    shard.parent.mkdir(parents=True)
    payload = open(list_shards(prepared, "train")[0], "rb").read()
    shard.write_bytes(payload[: len(payload) // 3] if damage == "truncated" else b"")
    with pytest.raises(BrokenArtifact) as err:
        list(iter_shard_samples([str(shard)]))
    assert str(shard) in str(err.value) and "dvc repro --force prepare" in str(err.value)


def test_a_model_folder_without_weights_or_with_a_broken_config_names_the_file(tmp_path):
    folder = tmp_path / "models" / "pdg" / "best"
    folder.mkdir(parents=True)
    (folder / "dual_encoder.json").write_text("{not json")
    with pytest.raises(BrokenArtifact, match=r"dual_encoder.json: not JSON .*dvc repro --force train@pdg"):
        DualEncoder.from_pretrained(folder)
    (folder / "dual_encoder.json").write_text('{"model": {}}')
    with pytest.raises(BrokenArtifact, match=r"without its weights \(model.safetensors\): dvc repro --force train@pdg"):
        DualEncoder.from_pretrained(folder)


def test_a_generator_folder_without_its_unet_names_what_is_missing(tmp_path):
    folder = tmp_path / "models" / "generator"
    (folder / "vae").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "vae" / "config.json").write_text("{}")
    with pytest.raises(BrokenArtifact, match=r"no unet/config.json, text_encoder/config.json\): dvc repro --force train_generator"):
        resolve_generator(folder)


@pytest.mark.slow  # a stage in a child process of the stage server
def test_the_stage_exits_with_the_one_line_and_no_traceback(prepared, stage_runner, tmp_path):
    project = make_tiny_project(tmp_path)
    shutil.copytree(prepared, project / "data" / "prepared")
    best = project / "models" / "baseline" / "best"
    best.mkdir(parents=True)
    (best / "training.json").write_text('{"epoch": 1}')
    (best / "dual_encoder.json").write_text('{"model": {}}')
    result = stage_runner.run(stage_command("evaluate@baseline"), cwd=project, timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "models/baseline/best: dual_encoder.json without its weights" in errors[0]
    assert "dvc repro --force train@baseline" in errors[0] and "Traceback" not in result.stderr
    assert not (project / "metrics" / "baseline.json").exists()
