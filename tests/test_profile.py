"""`python -m pipeline profile`: one command to the real recipe and back; external inputs checked
before any work, each problem one line naming its key."""

import contextlib
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.core import hub
from pipeline.core.config import HubConfig, load_params
from tiny_generator import build_tiny_generator
from pipeline.core.profile import EMBEDDED, check_inputs, profile_command, real_recipe
from tiny_models import save_tiny_clip
from tiny_project import REPO, make_tiny_project, stage_command

PARAMS = REPO / "params.yaml"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {"clip": save_tiny_clip(root / "clip"), "sd": build_tiny_generator(root / "sd", max_tokens=77)}


def _profile(tmp_path, name, **folders):
    params = tmp_path / "params.yaml"
    if not params.exists():
        shutil.copy(PARAMS, params)
    return params, profile_command(name, str(params), folders.get("data_root"), folders.get("clip"), folders.get("sd"),
                                   folders.get("captioner"))


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_embedded_profile_is_the_committed_params(tmp_path):
    params, code = _profile(tmp_path, "embedded")
    assert code == 0 and params.read_text() == PARAMS.read_text()


def test_cuhk_pedes_profile_writes_the_whole_recipe_and_embedded_undoes_it(tmp_path, folders, cuhk_mini, capsys):
    params, code = _profile(tmp_path, "cuhk-pedes", data_root=str(cuhk_mini), clip=str(folders["clip"]),
                            sd=str(folders["sd"]))
    assert code == 0, capsys.readouterr().out
    loaded = load_params(params)
    assert (loaded.data.source, loaded.data.root, loaded.model.preset) == ("cuhk-pedes", str(cuhk_mini), "clip-vit-b16")
    assert loaded.model.embed_dim == 24  # read from the checkpoint's projection_dim
    assert (loaded.pdg.source_count, loaded.pdg.num_steps, loaded.pdg.guidance) == (0, 50, 7.5)
    assert (loaded.pdg.inversion, loaded.pdg.canvas_height, loaded.pdg.canvas_width) == ("negative-prompt", 512, 192)
    assert loaded.filter.scorer == loaded.model.vision_path == str(folders["clip"])
    assert loaded.generator.pretrained == str(folders["sd"]) and loaded.train.head_lr == 5e-5
    text = params.read_text()
    assert "# The single source of truth" in text and "# hardness weighting of negatives" in text  # comments kept
    recipe = real_recipe("cuhk-pedes", "r", "c", "s")
    assert {s: set(v) for s, v in recipe.items()} == {s: set(v) for s, v in EMBEDDED.items()}  # same keys both ways
    _, code = _profile(tmp_path, "embedded")
    assert code == 0 and yaml.safe_load(params.read_text()) == yaml.safe_load(PARAMS.read_text())


def test_a_missing_folder_stops_the_profile_with_one_line_per_key_and_leaves_params_alone(tmp_path, folders, capsys):
    params, code = _profile(tmp_path, "rstpreid", data_root=str(tmp_path / "nowhere"), clip=str(folders["clip"]),
                            sd=str(tmp_path / "no-sd"))
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1 and params.read_text() == PARAMS.read_text()
    assert lines[0] == f"params: 'data.root' {tmp_path / 'nowhere'}: no such folder"
    assert lines[1] == f"params: 'generator.pretrained' {tmp_path / 'no-sd'}: no such folder"
    assert len(lines) == 3 and "left unchanged" in lines[2]


def test_a_folder_of_the_wrong_kind_and_a_data_root_without_annotations_are_named(tmp_path, folders):
    (tmp_path / "empty").mkdir()
    recipe = real_recipe("icfg-pedes", str(tmp_path / "empty"), str(folders["clip"]), str(folders["clip"]))
    from tiny_project import deep_merge
    from pipeline.core.config import params_from_dict

    params = params_from_dict(deep_merge(yaml.safe_load(PARAMS.read_text()), {**recipe, "model": {**recipe["model"], "embed_dim": 24}}))
    problems = check_inputs(params)
    assert problems[0].startswith(f"params: 'data.root' {tmp_path / 'empty'} has no annotation file of icfg-pedes")
    assert problems[1] == (f"params: 'generator.pretrained' {folders['clip']}: no model_index.json in it "
                           "(not a Stable Diffusion (diffusers) pipeline folder)")
    assert len(problems) == 2


def test_embed_dim_must_match_the_clip_projection(tmp_path, folders):
    from pipeline.core.config import params_from_dict

    clip = str(folders["clip"])
    params = params_from_dict({"model": {"preset": "clip-vit-b16", "vision_path": clip, "text_path": clip,
                                         "embed_dim": 512}})
    assert check_inputs(params, ("model.vision_path", "model.text_path")) == [
        f"params: 'model.embed_dim' is 512, but the CLIP checkpoint {clip} projects to 24: set model.embed_dim: 24"]


def test_a_hub_id_is_refused_offline_and_pinned_when_allowed(tmp_path, monkeypatch):
    from pipeline.core.config import params_from_dict

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    unpinned = params_from_dict({"filter": {"scorer": "openai/clip-vit-base-patch16"}})
    assert check_inputs(unpinned, ("filter.scorer",)) == [
        "params: 'filter.scorer' openai/clip-vit-base-patch16 is a hub id, but hub.revision is empty: pin the "
        "commit it loads (40 hex digits; a branch or tag moves, and DVC would not see the weights change)"]
    params = params_from_dict({"filter": {"scorer": "openai/clip-vit-base-patch16"}, "hub": {"revision": COMMIT}})
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert check_inputs(params, ("filter.scorer",)) == [
        "params: 'filter.scorer' openai/clip-vit-base-patch16 is a hub id, hub.allow_network is false and it is not "
        "in the local cache: give a local folder, or set hub.allow_network: true"]
    allowed = params_from_dict({"filter": {"scorer": "openai/clip-vit-base-patch16"},
                                "hub": {"allow_network": True, "revision": COMMIT}})
    assert check_inputs(allowed, ("filter.scorer",)) == []
    try:
        hub.configure(allowed.hub)
        assert hub.pretrained_kwargs("openai/clip-vit-base-patch16") == {"local_files_only": False, "revision": COMMIT}
        assert hub.pretrained_kwargs(tmp_path) == {"local_files_only": False}  # a folder has no revisions
    finally:
        hub.configure(HubConfig())
    assert hub.pretrained_kwargs("openai/clip-vit-base-patch16") == {"local_files_only": True}


@pytest.mark.slow  # two stages in child processes of the stage server: seconds, not milliseconds
def test_a_stage_with_a_missing_checkpoint_stops_before_any_work(stage_runner, tmp_path):
    project = make_tiny_project(tmp_path / "project", {
        "model": {"preset": "clip-vit-b16", "vision_path": str(tmp_path / "no-clip"), "text_path": str(tmp_path / "no-clip")},
        "filter": {"scorer": str(tmp_path / "no-clip")},
    })
    for stage, key in (("train", "model.vision_path"), ("filter", "filter.scorer")):
        args = stage_command("train@baseline" if stage == "train" else stage)
        result = stage_runner.run(args, cwd=project)
        assert result.returncode == 1, result.stderr
        assert f"params: '{key}' {tmp_path / 'no-clip'}: no such folder" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (project / "models").exists() and not (project / "data" / "pdg").exists()


def test_the_filter_depends_on_its_scorer_folder_not_on_the_baseline_when_clip_scores(tmp_path, folders):
    from dvc.repo import Repo

    def filter_deps(project):
        with contextlib.chdir(project), Repo(str(project)) as repo:
            (stage,) = repo.stage.collect("filter")
            return {Path(dep.def_path).as_posix() for dep in stage.deps}

    embedded = filter_deps(make_tiny_project(tmp_path / "embedded"))
    assert "models/baseline" in embedded
    real = filter_deps(make_tiny_project(tmp_path / "real", {"filter": {"scorer": str(folders["clip"])}}))
    assert Path(folders["clip"]).as_posix() in real and "models/baseline" not in real


def test_a_broken_config_json_and_a_missing_params_file_are_one_line_each(tmp_path, folders, cuhk_mini, capsys):
    broken = tmp_path / "broken-clip"
    broken.mkdir()
    (broken / "config.json").write_text("{oops")
    params, code = _profile(tmp_path, "cuhk-pedes", data_root=str(cuhk_mini), clip=str(broken), sd=str(folders["sd"]))
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1 and params.read_text() == PARAMS.read_text()
    assert lines[0].startswith(f"params: 'model.vision_path' {broken}: config.json is not valid JSON (")
    assert profile_command("embedded", str(tmp_path / "none.yaml"), None, None, None, None) == 1
    assert capsys.readouterr().out.strip() == f"params: cannot read {tmp_path / 'none.yaml'}: No such file or directory"


@pytest.mark.parametrize("gpus", ["0", "-2", "eight"])
def test_a_gpu_count_below_one_is_a_usage_error_naming_the_flag(gpus, capsys):
    from pipeline.cli import _parser

    with pytest.raises(SystemExit) as stopped:
        _parser().parse_args(["profile", "cuhk-pedes", "--gpus", gpus])
    assert stopped.value.code == 2
    assert f"argument --gpus: invalid _gpu_count value: '{gpus}'" in capsys.readouterr().err


def test_a_gpu_count_sets_both_launchers():
    from pipeline.core.profile import launcher_for

    recipe = real_recipe("cuhk-pedes", "r", "c", "s", gpus=8)
    assert recipe["train"]["launcher"] == recipe["pdg"]["launcher"] == launcher_for(8) == \
        "accelerate launch --multi_gpu --num_processes 8"
    assert real_recipe("cuhk-pedes", "r", "c", "s")["train"]["launcher"] == "python"
