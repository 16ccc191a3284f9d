"""experiments.hardness's bookkeeping: row names to `-S` overrides, the queue commands, reading
`dvc exp show --json` into a table, and the val-only choice of the default."""

import pytest

from experiments.ablation import experiments
from experiments.hardness import choose, markdown, queue_command, records, row_overrides, summary


def test_a_row_name_sets_every_loss_setting_it_names():
    assert row_overrides("beta-2") == {"loss.beta": 2.0, "model.init_temperature": 0.07, "model.learn_temperature": True}
    assert row_overrides("tau-0.005") == {"loss.beta": 0.0, "model.init_temperature": 0.005,
                                          "model.learn_temperature": False}
    assert row_overrides("beta-4-tau-0.02") == {"loss.beta": 4.0, "model.init_temperature": 0.02,
                                                "model.learn_temperature": False}
    for bad in ("", "beta-", "beta-2tau-0.02", "-tau-1", "gamma-1", "beta-x"):
        with pytest.raises(ValueError, match="expected beta-<b>, tau-<t> or beta-<b>-tau-<t>"):
            row_overrides(bad)


def test_queue_commands_run_the_baseline_evaluation_with_the_row_and_seed():
    command = queue_command("beta-2-tau-0.02", 1)
    assert command[:6] == ["dvc", "exp", "run", "--queue", "--name", "beta-2-tau-0.02-s1"]
    pairs = [command[i + 1] for i, word in enumerate(command) if word == "--set-param"]
    assert pairs == ["loss.beta=2.0", "model.init_temperature=0.02", "model.learn_temperature=false", "train.seed=1"]
    assert command[-1] == "evaluate@baseline"  # the train stage and its evaluation, not the PDG chain
    with pytest.raises(SystemExit, match=r"'loss.beta' must be in \[0.0, 100.0\], got 200.0"):
        queue_command("beta-200", 0)


def _revision(name, val_r1, test_r1, skipped=0):
    return {"rev": name.encode().hex()[:40].ljust(40, "0"), "name": name, "error": None, "data": {
        "params": {"params.yaml": {"data": {}}},
        "metrics": {
            "metrics/train_baseline.json": {"data": {"best_val_R1": val_r1, "best_val_mAP": val_r1 + 1,
                                                     "skipped_batches": skipped}},
            "metrics/baseline.json": {"data": {"R1": test_r1, "R5": 50.0, "R10": 60.0, "mAP": 25.0, "mINP": 15.0,
                                               "colour_sensitivity": {"all": {"prefers_true_pct": 80.0}}}}}}}


def _show(*revisions):
    return [{"rev": "1" * 40, "name": "main", "data": {}, "error": None,
             "experiments": [{"name": r["name"], "executor": None, "revs": [r]} for r in revisions]}]


def _table(rows: dict[str, list[tuple[float, float]]]):
    show = _show(*[_revision(f"{row}-s{seed}", val, test) for row, runs in rows.items()
                   for seed, (val, test) in enumerate(runs)])
    table = records(experiments(show), list(rows), [0, 1, 2])
    return table, summary(table)


def test_the_default_changes_only_for_a_val_gain_beyond_the_seed_spread():
    # beta-2 is best on val by 1.0, with seed stds of 1.0 and 0.5: not beyond the spread
    table, stats = _table({"beta-0": [(33.0, 20.0), (34.0, 21.0), (35.0, 22.0)],
                           "beta-2": [(34.5, 30.0), (35.0, 30.0), (35.5, 30.0)]})
    assert stats["beta-0"]["val_R1"] == (34.0, 1.0) and stats["beta-2"]["R1"][0] == 30.0
    chosen, why = choose(table, stats, "beta-0")
    assert chosen == "beta-0" and "within the seed spread (1.00): the default stays" in why
    # a gain of 3.0 beyond both stds: chosen, although test R1 (never used to choose) is lower
    table, stats = _table({"beta-0": [(33.0, 25.0), (34.0, 25.0), (35.0, 25.0)],
                           "beta-4": [(36.5, 20.0), (37.0, 20.0), (37.5, 20.0)]})
    chosen, why = choose(table, stats, "beta-0")
    assert chosen == "beta-4" and "val R1 37.00 vs 34.00" in why


def test_rows_missing_a_seed_of_the_default_do_not_compete_and_the_default_must_be_there():
    table, stats = _table({"beta-0": [(34.0, 20.0), (34.0, 20.0)], "beta-8": [(40.0, 20.0)]})
    assert choose(table, stats, "beta-0")[0] == "beta-0"  # beta-8 has seed 0 only
    with pytest.raises(SystemExit, match="needs the default row beta-0 at two seeds"):
        choose(*_table({"beta-1": [(34.0, 20.0), (35.0, 20.0)]}), "beta-0")


def test_the_table_has_every_row_with_mean_and_std():
    table, stats = _table({"beta-0": [(34.0, 20.0), (36.0, 22.0)], "tau-0.005": [(30.0, 18.0)]})
    lines = markdown(table, stats).splitlines()
    assert lines[2].startswith("| beta-0 | beta 0.0, init_temperature 0.07, learn_temperature True | 0, 1 | 35.00 ± 1.41 | 36.00 ± 1.41 | 21.00 ± 1.41")
    assert lines[3].startswith("| tau-0.005 | beta 0.0, init_temperature 0.005, learn_temperature False | 0 | 30.00 |")
    assert lines[2].endswith("| 80.00 ± 0.00 | 0 |")
