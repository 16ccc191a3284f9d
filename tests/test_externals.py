"""What params name outside the repository is visible to DVC: the `externals` stage's digests
change exactly when the folders' contents change, and DVC reruns the stage that reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import params_from_dict
from pipeline.data.canonical import manifest_path, read_manifest
from pipeline.externals import DigestState, stage_digests, write_stage_digests
from tiny_project import dvc, make_tiny_project, stale_stages

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cuhk(root: Path):
    return params_from_dict({"data": {"source": "cuhk-pedes", "root": str(root)}})


def test_annotation_and_image_edits_change_the_prepare_digest_and_nothing_else(cuhk_copy, tmp_path):
    state = DigestState(tmp_path / "state.json")
    first = stage_digests(_cuhk(cuhk_copy), state)
    entry = first["prepare"]["data.root"]
    assert entry["reads"] and entry["files"] == 33  # 32 crops and reid_raw.json
    assert entry["annotations"]["path"].endswith("reid_raw.json") and len(entry["annotations"]["sha256"]) == 64
    assert first["train"] == {"model.vision_path": {"value": "", "reads": False},
                              "model.text_path": {"value": "", "reads": False}}
    assert first["filter"]["filter.scorer"]["tracked_by"].startswith("dvc.yaml")
    assert state.hashed == 33
    state.save()

    again = DigestState(tmp_path / "state.json")
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
    state = DigestState(tmp_path / "state.json")
    before = stage_digests(params, state)["caption"]["caption.captioner"]
    assert before["reads"] and before["files"] == 2
    (captioner / "model.safetensors").write_bytes(b"\x01" * 1000)  # same size: the weights were swapped
    after = stage_digests(params, state)["caption"]["caption.captioner"]
    assert after["sha256"] != before["sha256"]


def test_a_missing_folder_is_recorded_as_its_problem_line(tmp_path):
    params = params_from_dict({"caption": {"captioner": str(tmp_path / "nowhere")}})
    entry = stage_digests(params, DigestState(tmp_path / "state.json"))["caption"]["caption.captioner"]
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
    entry = stage_digests(pinned, DigestState(tmp_path / "state.json"))["caption"]["caption.captioner"]
    assert entry == {"value": "org/captioner", "reads": True, "hub_id": "org/captioner", "revision": COMMIT}
    for revision, said in (("", "is empty"), ("main", "is 'main', not a commit hash")):
        unpinned = params_from_dict({"caption": {"captioner": "org/captioner"}, "hub": {"revision": revision}})
        line = stage_digests(unpinned, DigestState(tmp_path / "state.json"))["caption"]["caption.captioner"]
        assert line == {"problems": [f"params: 'caption.captioner' org/captioner is a hub id, but hub.revision {said}: "
                                     "pin the commit it loads (40 hex digits; a branch or tag moves, and DVC would "
                                     "not see the weights change)"]}


def test_an_unreadable_file_under_data_root_is_a_problem_line_not_a_traceback(cuhk_copy, tmp_path, monkeypatch):
    import pipeline.externals

    crop = sorted((cuhk_copy / "imgs").rglob("*.png"))[0]
    real = pipeline.externals.file_digest

    def digest(path):  # what reading a file without read permission raises (the tests run as root)
        if Path(path) == crop:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(pipeline.externals, "file_digest", digest)
    entry = stage_digests(_cuhk(cuhk_copy), DigestState(tmp_path / "state.json"))["prepare"]["data.root"]
    assert entry == {"problems": [f"params: 'data.root': {crop}: Permission denied"]}


def test_a_broken_link_under_data_root_is_part_of_the_digest(cuhk_copy, tmp_path):
    state = DigestState(tmp_path / "state.json")
    before = stage_digests(_cuhk(cuhk_copy), state)["prepare"]["data.root"]
    (cuhk_copy / "imgs" / "dangling.png").symlink_to(cuhk_copy / "nowhere.png")
    after = stage_digests(_cuhk(cuhk_copy), state)["prepare"]["data.root"]
    assert after["files"] == before["files"] + 1 and after["sha256"] != before["sha256"]


def test_written_digests_are_byte_identical_when_nothing_changed(cuhk_copy, tmp_path):
    out = tmp_path / "externals"
    state = DigestState(tmp_path / "state.json")
    write_stage_digests(_cuhk(cuhk_copy), out, state)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(first) == {"prepare.json", "train.json", "train_generator.json", "generate.json", "filter.json",
                          "caption.json"}
    write_stage_digests(_cuhk(cuhk_copy), out, DigestState(tmp_path / "state.json"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


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
