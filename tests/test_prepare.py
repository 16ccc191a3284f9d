"""The `prepare` stage: SynthPedes through real `dvc repro`, and the real CUHK-PEDES excerpt."""

import json
import shutil

import pytest
import yaml

from pipeline.config import params_from_dict
from pipeline.data.canonical import SPLITS, iter_shard_samples, list_shards, manifest_path, read_manifest
from pipeline.data.prepare import DataProblemsError, prepare
from tiny_project import FIXTURES, TINY_PROFILE, dvc, make_tiny_project

CUHK_MINI = FIXTURES / "cuhk-pedes-mini"


def _lock_outs(project):
    stage = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["prepare"]
    return {out["path"]: out["md5"] for out in stage["outs"]}


def test_dvc_repro_prepare_builds_the_canonical_form_reproducibly(tmp_path):
    project = make_tiny_project(tmp_path)
    dvc(project, "repro", "prepare")
    prepared = project / "data" / "prepared"
    synth = TINY_PROFILE["synth"]
    for split, ids in (("train", "num_train_ids"), ("val", "num_val_ids"), ("test", "num_test_ids")):
        rows = read_manifest(manifest_path(prepared, split))
        assert len(rows) == synth[ids] * synth["images_per_id"]
        assert sorted({r.person_id for r in rows}) == list(range(synth[ids]))
        samples = list(iter_shard_samples(list_shards(prepared, split)))
        assert [s["__key__"] for s in samples] == [r.key for r in rows]
    metrics = json.loads((project / "metrics" / "data.json").read_text())
    assert metrics["splits"]["test"]["identities"] == synth["num_test_ids"]
    assert (project / "reports" / "prepare" / "contact_sheet.png").stat().st_size > 1000

    first = _lock_outs(project)
    shutil.rmtree(prepared)
    dvc(project, "repro", "--force", "prepare")
    assert _lock_outs(project) == first  # byte-identical outputs from scratch


@pytest.fixture
def cuhk_mini():
    if not CUHK_MINI.exists():
        pytest.skip(f"real fixture not found at {CUHK_MINI} (set TBPS_FIXTURES)")
    return CUHK_MINI


def _cuhk_params(root, **data):
    return params_from_dict({"data": {"source": "cuhk-pedes", "root": str(root), "shard_size": 8, **data}})


def test_prepare_real_cuhk_pedes_excerpt(tmp_path, cuhk_mini):
    result = prepare(_cuhk_params(cuhk_mini), tmp_path)
    expected = {"train": (5, 20), "val": (1, 4), "test": (2, 8)}  # ids, images (fixtures README)
    for split in SPLITS:
        rows = read_manifest(manifest_path(tmp_path, split))
        assert (len({r.person_id for r in rows}), len(rows)) == expected[split]
        assert {r.person_id for r in rows} == set(range(expected[split][0]))
        assert all(len(r.captions) == 2 and (r.width, r.height) == (60, 160) for r in rows)
        assert all(r.source == "cuhk-pedes" and r.image_path.startswith("imgs/") for r in rows)
        shards = list_shards(tmp_path, split)
        assert len(shards) == -(-expected[split][1] // 8)
        first = next(iter_shard_samples(shards))
        assert first["png"] == (cuhk_mini / rows[0].image_path).read_bytes()
    assert result.skipped == []


def test_bad_records_stop_prepare_unless_skipped(tmp_path, cuhk_mini):
    broken = tmp_path / "cuhk"
    shutil.copytree(cuhk_mini, broken)
    annotations = json.loads((broken / "reid_raw.json").read_text())
    victim = next(r for r in annotations if r["split"] == "train")
    (broken / "imgs" / victim["file_path"]).unlink()

    with pytest.raises(DataProblemsError, match="1 problem"):
        prepare(_cuhk_params(broken), tmp_path / "strict")

    result = prepare(_cuhk_params(broken, skip_bad_records=True), tmp_path / "lenient")
    assert len(result.records["train"]) == 19
    report = json.loads((tmp_path / "lenient" / "report.json").read_text())
    assert len(report["skipped"]) == 1 and victim["file_path"] in report["skipped"][0]["where"]
