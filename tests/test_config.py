"""params.yaml is validated once, with errors that name the key."""

import dataclasses
from pathlib import Path

import pytest

from pipeline.core.config import ConfigError, DataConfig, Params, load_params, params_from_dict

REPO = Path(__file__).resolve().parents[1]


def test_committed_params_load_with_their_values():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "synthpedes"
    assert params.synth.num_train_ids == 600
    assert isinstance(params.data.val_fraction, float)


def test_missing_keys_take_defaults():
    params = params_from_dict({"data": {"source": "cuhk-pedes"}})
    assert params.data.source == "cuhk-pedes"
    assert params.data.shard_size == DataConfig().shard_size
    assert params.synth == Params().synth


def test_int_is_accepted_for_float():
    assert params_from_dict({"data": {"val_fraction": 0}}).data.val_fraction == 0.0


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"data": {"sourc": "synthpedes"}}, "unknown key 'data.sourc'"),
        ({"dat": {}}, "unknown key 'dat'"),
        ({"data": {"shard_size": "big"}}, "'data.shard_size' must be int"),
        ({"data": {"shard_size": 2.5}}, "'data.shard_size' must be int"),
        ({"data": {"skip_bad_records": "yes"}}, "'data.skip_bad_records' must be bool"),
        ({"synth": {"num_train_ids": True}}, "'synth.num_train_ids' must be int"),
        ({"data": {"shard_size": 0}}, "'data.shard_size' must be in [1, None]"),
        ({"data": {"val_fraction": 0.9}}, "'data.val_fraction' must be in [0.0, 0.5]"),
        ({"data": {"source": "market1501"}}, "'data.source' must be one of"),
        ({"data": ["source"]}, "'data' must be a mapping"),
        ({"generator": {"minilm_layers": 7}}, "'generator.minilm_layers' must be in [1, 6]"),
        ({"variants": {"pdg": {"online": {"embedding_neighbours": "yes"}}}},
         "'variants.pdg.online.embedding_neighbours' must be bool"),
        ({"synth": {"num_generator_ids": -1}}, "'synth.num_generator_ids' must be in [0, None]"),
        ({"data": {"source": "cuhk-pedes"}, "synth": {"num_generator_ids": 5}},
         "'synth.num_generator_ids' renders SynthPedes identities, but data.source is 'cuhk-pedes'"),
        ({"synth": {"num_generator_ids": 5}, "generator": {"pretrained": "some/sd"}}, "generator.pretrained is set"),
    ],
)
def test_bad_params_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    assert message in str(err.value)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_params(tmp_path / "absent.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(broken)


def test_an_unquoted_no_from_dvc_exp_run_still_means_no_mixed_precision():
    # `dvc exp run -S ...` rewrites params.yaml and drops the quotes around "no"; YAML reads false
    assert params_from_dict({"train": {"mixed_precision": False}}).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        params_from_dict({"train": {"mixed_precision": True}})


REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_the_field_defaults_are_the_shipped_params(tmp_path):
    # one set of values: the shipped params.yaml; the dataclass defaults (programmatic use) equal it
    # (variants: the code knows only the baseline; pdg is the shipped file's)
    shipped, defaults = load_params(REPO_PARAMS), params_from_dict({})
    assert dataclasses.replace(shipped, variants={}) == dataclasses.replace(defaults, variants={})
    assert shipped.variants["baseline"] == defaults.variants["baseline"] and set(shipped.variants) == {"baseline", "pdg"}


@pytest.mark.parametrize("text, message", [
    ("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "key 'lr' appears twice in one mapping (lines 2 and 3)"),
    ("train:\n  lr: .nan\n", "'train.lr' must be a finite number, got nan"),
    ("filter:\n  margin_level: .inf\n", "'filter.margin_level' must be a finite number, got inf"),
    ("train:\n  seed: -1\n", "'train.seed' must be in [0, None]"),
    ("data:\n  image_height: 60\n", "'model.patch_size' 8 does not divide the image size 60x32"),
    ("pdg:\n  method: img2img\n  strength: 0.01\n  num_steps: 20\n", "'pdg.strength' 0.01 leaves none of the 20 steps"),
])
def test_a_bad_value_in_a_params_file_is_one_line_naming_the_key(tmp_path, text, message):
    import yaml

    shipped = yaml.safe_load(REPO_PARAMS.read_text())
    override = {k: v for k, v in yaml.safe_load(text.replace("  lr: 2.0e-3\n", "")).items()}
    merged = {k: ({**shipped[k], **override[k]} if k in override else v) for k, v in shipped.items()}
    path = tmp_path / "params.yaml"
    body = yaml.safe_dump(merged, sort_keys=False)
    if "appears twice" in message:  # a repeated key cannot survive a dump: write it as a user would
        body = text + yaml.safe_dump({k: v for k, v in merged.items() if k != "train"}, sort_keys=False)
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_params_file_without_a_key_names_it(tmp_path):
    import yaml

    shipped = yaml.safe_load(REPO_PARAMS.read_text())
    del shipped["train"]["seed"], shipped["pdg"]["batch_size"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(shipped, sort_keys=False))
    with pytest.raises(ConfigError, match=r"missing key 'train.seed'"):
        load_params(tmp_path / "params.yaml")
    del shipped["variants"]["baseline"]["online"]
    shipped["train"]["seed"], shipped["pdg"]["batch_size"] = 0, 16
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(shipped, sort_keys=False))
    with pytest.raises(ConfigError, match=r"missing key 'variants.baseline.online'"):
        load_params(tmp_path / "params.yaml")
