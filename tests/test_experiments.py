"""experiments.ablation's bookkeeping: experiment names, `-S` overrides, reading `dvc exp show --json`
(DVC 3's layout) and the tables, per machine. The queue-run-report loop itself runs in test_dag.py."""

from experiments.ablation import ROWS, experiment_name, experiments, markdown, queue_command, results, same_experiment

MACHINE_B = {"cpu": "Xeon", "isa": "avx512+amx", "gpu": "", "torch": "2.13.0+cpu"}


def _revision(name, seed, metrics, error=None):
    return {"rev": "0" * 40, "name": name, "error": error, "data": {
        "params": {"params.yaml": {"data": {"train": {"seed": seed}}}},
        "metrics": {"metrics/pdg.json": {"data": metrics}} if metrics else {},
    }}


def _show(*revisions, states=None):
    states = states or {}
    return [{"rev": "workspace", "name": None, "data": {}, "error": None, "experiments": None},
            {"rev": "1" * 40, "name": "main", "data": {}, "error": None,
             "experiments": [{"name": r["name"], "revs": [r], "executor": {"state": states[r["name"]]}
                              if r["name"] in states else None} for r in revisions]}]


def _metrics(r1, machine=MACHINE_B):
    return {"R1": r1, "R5": 50.0, "R10": 60.0, "mAP": 25.0, "mINP": 15.0, "machine": machine}


def test_queue_commands_name_the_row_and_seed_and_set_its_params():
    command = queue_command("offline", 2)
    assert command[:6] == ["dvc", "exp", "run", "--queue", "--name", "offline-s2"]
    pairs = [command[i + 1] for i, word in enumerate(command) if word == "--set-param"]
    assert pairs == ["variants.pdg.online.text_prob=0.0", "variants.pdg.online.mixup_prob=0.0", "train.seed=2"]
    assert "filter.enabled=false" in queue_command("filter-off", 0)  # YAML's false, not Python's False
    assert experiment_name("text-only-pdg-steps", 1) == "text-only-pdg-steps-s1"
    assert same_experiment("pdg") == same_experiment("baseline") == ["baseline", "pdg"]  # one experiment, both variants
    assert same_experiment("offline") == ["offline"]
    assert all(variant in ("baseline", "pdg") for variant, _, _ in ROWS.values())


def test_exp_show_is_read_into_rows_per_seed_and_failed_runs_are_left_out():
    show = _show(_revision("baseline-s0", 0, _metrics(24.0)), _revision("pdg-s1", 1, _metrics(22.0)),
                 _revision("pdg-s2", 2, None, error={"msg": "failed"}), _revision("offline-s0", 0, _metrics(20.0)),
                 _revision("pdg-plus-s0", 0, _metrics(99.0)))
    found = experiments(show)
    assert sorted(found) == ["baseline-s0", "offline-s0", "pdg-plus-s0", "pdg-s1"]
    table = results(found, ["pdg", "offline"])
    assert [r["seed"] for r in table["pdg"]] == [0, 1] and table["offline"][0]["R1"] == 20.0
    text = markdown(table)
    assert "| pdg | Xeon (avx512+amx) | 0, 1 | 23.00 ± 1.41 | 50.00 ± 0.00 |" in text
    assert "| offline | Xeon (avx512+amx) | 0 | 20.00 | 50.00 |" in text


def test_queued_and_running_experiments_are_not_read_as_results():
    # a queued or running experiment shows its baseline commit's metrics: they are not its own
    show = _show(_revision("pdg-s0", 0, _metrics(24.0)), _revision("pdg-s1", 1, _metrics(24.0)),
                 _revision("pdg-s2", 2, _metrics(24.0)), _revision("oracle-s0", 0, _metrics(26.0)),
                 states={"pdg-s1": "queued", "pdg-s2": "running", "oracle-s0": "success"})
    assert sorted(experiments(show)) == ["oracle-s0", "pdg-s0"]


def test_figures_from_two_machines_never_share_a_row():
    other = {**MACHINE_B, "cpu": "EPYC", "isa": "avx2"}
    show = _show(_revision("pdg-s0", 0, _metrics(24.0)), _revision("pdg-s1", 1, _metrics(20.0, other)))
    lines = markdown(results(experiments(show), ["pdg"])).splitlines()
    assert "| pdg | EPYC (avx2) | 1 | 20.00 |" in lines[2] and "| pdg | Xeon (avx512+amx) | 0 | 24.00 |" in lines[3]
