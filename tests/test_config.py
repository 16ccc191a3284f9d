"""params.yaml is validated once, with errors that name the key."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError, DataConfig, Params, load_params, params_from_dict

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
        ({"data": {"source": "rstpreid"}, "filter": {"attribute_probe": "reject_wrong"}}, "'filter.attribute_probe' needs"),
        ({"filter": {"attribute_probe": "confirmed_only"}, "generator": {"pretrained": "some/sd"}},
         "'filter.attribute_probe' needs"),
        ({"filter": {"attribute_probe": "yes"}}, "'filter.attribute_probe' must be one of"),
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
