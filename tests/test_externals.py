"""What params name outside the repository is visible to DVC: the `externals` stage's digests
change exactly when the folders' contents change, and DVC reruns the stage that reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.config import params_from_dict
from pipeline.data.canonical import manifest_path, read_manifest
from pipeline.externals import LEGACY_STATE_FILE, stage_digests, write_stage_digests
from pipeline.core.io import DigestCache
from tiny_project import dvc, make_tiny_project, stale_stages

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cuhk(root: Path):
    return params_from_dict({"data": {"source": "cuhk-pedes", "root": str(root)}})


def test_annotation_and_image_edits_change_the_prepare_digest_and_nothing_else(cuhk_copy, tmp_path):
    cache = DigestCache(tmp_path / "digests")
    first = stage_digests(_cuhk(cuhk_copy), cache)
    entry = first["prepare"]["data.root"]
    assert entry["reads"] and entry["files"] == 33  # 32 crops and reid_raw.json
    assert entry["annotations"]["path"].endswith("reid_raw.json") and len(entry["annotations"]["sha256"]) == 64
    assert first["train"] == {"model.vision_path": {"value": "", "reads": False},
                              "model.text_path": {"value": "", "reads": False}}
    assert first["filter"]["filter.scorer"]["tracked_by"].startswith("dvc.yaml")
    assert cache.hashed == 33
    cache.save()

    again = DigestCache(tmp_path / "digests")  # a later run: reads the saved cache
    assert stage_digests(_cuhk(cuhk_copy), again) == first and again.hashed == 0  # known by size and mtime

    annotations = cuhk_copy / "reid_raw.json"
    records = json.loads(annotations.read_text())
    records[0]["captions"][0] = records[0]["captions"][0].replace("a", "o", 1)  # same length, new content
    annotations.write_text(json.dumps(records))
    edited = stage_digests(_cuhk(cuhk_copy), again)
    assert edited["prepare"]["data.root"]["annotations"]["sha256"] != entry["annotations"]["sha256"]
    assert edited["prepare"]["data.root"]["sha256"] != entry["sha256"]
    assert again.hashed == 1  # only the edited file was read again

    crops = sorted((cuhk_copy / "imgs").rglob("*.png"))
    crops[0].write_bytes(crops[1].read_bytes())
    swapped = stage_digests(_cuhk(cuhk_copy), again)["prepare"]["data.root"]
    assert swapped["sha256"] != edited["prepare"]["data.root"]["sha256"]
    assert swapped["annotations"] == edited["prepare"]["data.root"]["annotations"]


def test_a_swapped_checkpoint_changes_its_consumers_digest(tmp_path):
    captioner = tmp_path / "captioner"
    captioner.mkdir()
    (captioner / "config.json").write_text(json.dumps({"model_type": "blip"}))
    (captioner / "model.safetensors").write_bytes(b"\x00" * 1000)
    params = params_from_dict({"caption": {"captioner": str(captioner)}})
    cache = DigestCache(tmp_path / "digests")
    before = stage_digests(params, cache)["caption"]["caption.captioner"]
    assert before["reads"] and before["files"] == 2
    (captioner / "model.safetensors").write_bytes(b"\x01" * 1000)  # same size: the weights were swapped
    after = stage_digests(params, cache)["caption"]["caption.captioner"]
    assert after["sha256"] != before["sha256"]


def test_a_missing_folder_is_recorded_as_its_problem_line(tmp_path):
    params = params_from_dict({"caption": {"captioner": str(tmp_path / "nowhere")}})
    entry = stage_digests(params, DigestCache(tmp_path / "digests"))["caption"]["caption.captioner"]
    assert entry == {"problems": [f"params: 'caption.captioner' {tmp_path / 'nowhere'}: no such folder"]}


def test_a_hub_id_is_its_id_and_pinned_commit_and_a_branch_is_no_pin(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--captioner" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "blip"}))
    (cache / "models--org--captioner" / "refs").mkdir()
    (cache / "models--org--captioner" / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    pinned = params_from_dict({"caption": {"captioner": "org/captioner"}, "hub": {"revision": COMMIT}})
    entry = stage_digests(pinned, DigestCache(tmp_path / "digests"))["caption"]["caption.captioner"]
    assert entry == {"value": "org/captioner", "reads": True, "hub_id": "org/captioner", "revision": COMMIT}
    for revision, said in (("", "is empty"), ("main", "is 'main', not a commit hash")):
        unpinned = params_from_dict({"caption": {"captioner": "org/captioner"}, "hub": {"revision": revision}})
        line = stage_digests(unpinned, DigestCache(tmp_path / "digests"))["caption"]["caption.captioner"]
        assert line == {"problems": [f"params: 'caption.captioner' org/captioner is a hub id, but hub.revision {said}: "
                                     "pin the commit it loads (40 hex digits; a branch or tag moves, and DVC would "
                                     "not see the weights change)"]}


def test_an_unreadable_file_under_data_root_is_a_problem_line_not_a_traceback(cuhk_copy, tmp_path, monkeypatch):
    import pipeline.core.io

    crop = sorted((cuhk_copy / "imgs").rglob("*.png"))[0]
    real = pipeline.core.io.file_digest

    def digest(path):  # what reading a file without read permission raises (the tests run as root)
        if Path(path) == crop:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(pipeline.core.io, "file_digest", digest)
    entry = stage_digests(_cuhk(cuhk_copy), DigestCache(tmp_path / "digests"))["prepare"]["data.root"]
    assert entry == {"problems": [f"params: 'data.root': {crop}: Permission denied"]}


def test_only_the_images_the_annotation_file_names_are_digested(cuhk_copy, tmp_path):
    cache = DigestCache(tmp_path / "digests")
    before = stage_digests(_cuhk(cuhk_copy), cache)["prepare"]["data.root"]
    (cuhk_copy / "imgs" / "CUHK01" / "unnamed.png").write_bytes(b"not in reid_raw.json")
    (cuhk_copy / "imgs" / "dangling.png").symlink_to(cuhk_copy / "nowhere.png")
    (cuhk_copy / "notes.txt").write_text("a file prepare never reads")
    assert stage_digests(_cuhk(cuhk_copy), cache)["prepare"]["data.root"] == before
    assert cache.hashed == 33  # the 32 named crops and the annotation file, once

    named = json.loads((cuhk_copy / "reid_raw.json").read_text())[0]["file_path"]
    crop = cuhk_copy / "imgs" / named
    crop.unlink()
    crop.symlink_to(cuhk_copy / "nowhere.png")  # a named image that is a link to nothing: missing
    missing = stage_digests(_cuhk(cuhk_copy), cache)["prepare"]["data.root"]
    assert "problems" not in missing  # prepare reports it (or skips its record): not this stage's to stop on
    assert missing["sha256"] != before["sha256"]
    assert (missing["files"], missing["missing_images"]) == (32, 1)


def test_written_digests_are_byte_identical_when_nothing_changed(cuhk_copy, tmp_path, monkeypatch):
    out = tmp_path / "externals"
    cache = DigestCache(tmp_path / "digests")
    write_stage_digests(_cuhk(cuhk_copy), out, cache)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(first) == {"prepare.json", "train.json", "train_generator.json", "generate.json", "filter.json",
                          "caption.json"}
    buckets = sorted((tmp_path / "digests").glob("*.json"))
    assert 1 <= len(buckets) <= 2  # the crops' folder and the root's (reid_raw.json): one bucket each
    assert all(b"\n" not in bucket.read_bytes() for bucket in buckets)  # one line of JSON, no indent
    assert sum(bucket.stat().st_size for bucket in buckets) < 33 * 150  # under 150 bytes per file

    monkeypatch.chdir(tmp_path)  # a DVC project whose .dvc/tmp still holds the old stage's state
    LEGACY_STATE_FILE.parent.mkdir(parents=True)
    LEGACY_STATE_FILE.write_text("{}")
    write_stage_digests(_cuhk(cuhk_copy), out)  # the project's cache, .dvc/tmp/digests
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert not LEGACY_STATE_FILE.exists() and any((tmp_path / ".dvc" / "tmp" / "digests").glob("*.json"))


@pytest.mark.slow
def test_dvc_reruns_prepare_when_the_annotation_file_under_data_root_changes(cuhk_copy, tmp_path):
    project = make_tiny_project(tmp_path / "project", {"data": {"source": "cuhk-pedes", "root": str(cuhk_copy)}})
    first = dvc(project, "repro", "prepare").stdout
    assert "Running stage 'externals'" in first and "Running stage 'prepare'" in first
    assert stale_stages(project, "prepare") == {}
    second = dvc(project, "repro", "prepare").stdout
    assert "Stage 'prepare' didn't change, skipping" in second  # externals ran, wrote the same bytes

    annotations = cuhk_copy / "reid_raw.json"
    records = json.loads(annotations.read_text())
    edited = records[0]["captions"][0] = records[0]["captions"][0] + " EDITED"
    annotations.write_text(json.dumps(records))
    third = dvc(project, "repro", "prepare").stdout
    assert "Running stage 'prepare'" in third
    rows = [row for split in ("train", "val", "test")
            for row in read_manifest(manifest_path(project / "data" / "prepared", split))]
    assert any(edited in row.captions for row in rows)  # prepare read the edited file
    assert stale_stages(project, "prepare") == {}
