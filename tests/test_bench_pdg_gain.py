"""The PDG-gain benchmark's bookkeeping: how a row's project is built, how its epochs are matched
to pdg's steps, and how recorded runs are kept, dropped and averaged. No training runs here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from pipeline.data.canonical import ImageRecord, manifest_path, write_manifest

BENCH_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pdg_gain.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pdg_gain", BENCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _manifest(folder: Path, images: int, captions_per_image: int) -> None:
    records = [
        ImageRecord(key=f"train-{i:06d}", person_id=i // 2, original_id=i // 2, split="train",
                    captions=[f"caption {i} {c}" for c in range(captions_per_image)], image_path=f"{i}.png",
                    source="test", width=32, height=64)
        for i in range(images)
    ]
    write_manifest(records, manifest_path(folder, "train"))


@pytest.fixture
def repo(tmp_path: Path, bench, monkeypatch) -> Path:
    """A stand-in checkout after `dvc repro`: code folders, params, outputs to link."""
    root = tmp_path / "repo"
    for folder in ("pipeline", "stages", "data/pdg/raw", "data/pdg/filtered", "models/generator", "models/probe",
                   "models/baseline"):
        (root / folder).mkdir(parents=True)
    (root / "pipeline" / "marker.py").write_text("# copied, not linked\n")
    _manifest(root / "data" / "prepared", images=150, captions_per_image=2)  # 300 pairs: 4 steps of 64
    _manifest(root / "data" / "pdg" / "train", images=200, captions_per_image=2)  # 400 pairs: 6 steps
    params = {
        "train": {"epochs": 10, "batch_size": 64, "seed": 0},
        "pdg": {"num_samples": 2},
        "filter": {"enabled": True},
        "variants": {
            "baseline": {"data": "data/prepared"},
            "pdg": {"data": "data/pdg/train", "online": {"text_prob": 0.2, "text_fraction": 0.2, "mixup_prob": 0.3}},
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setattr(bench, "REPO", root)
    return root


def _params(project: Path) -> dict:
    return yaml.safe_load((project / "params.yaml").read_text())


def test_rerun_stage_outputs_are_not_linked_and_overrides_land_in_params(bench, repo, tmp_path):
    project = bench.make_project("filter-off", 2, tmp_path / "work")
    params = _params(project)
    assert params["filter"]["enabled"] is False and params["train"]["seed"] == 2
    assert (project / "pipeline" / "marker.py").is_file() and not (project / "pipeline").is_symlink()
    for linked in ("data/prepared", "data/pdg/raw", "models/generator", "models/baseline"):
        assert (project / linked).is_symlink(), linked
    for rerun in ("data/pdg/filtered", "data/pdg/train"):  # the filter and caption stages rewrite them
        assert not (project / rerun).exists(), rerun


def test_the_probe_filter_row_refilters_with_the_checkouts_probe(bench, repo, tmp_path):
    project = bench.make_project("probe-filter", 0, tmp_path / "work")
    assert _params(project)["filter"] == {"enabled": True, "attribute_probe": "confirmed_only"}
    assert (project / "models" / "probe").is_symlink() and not (project / "data" / "pdg" / "filtered").exists()


def test_online_switches_keep_the_other_online_params(bench, repo, tmp_path):
    online = _params(bench.make_project("offline+text", 0, tmp_path / "work"))["variants"]["pdg"]["online"]
    assert online == {"text_prob": 0.2, "text_fraction": 0.2, "mixup_prob": 0.0}


def test_baseline_rows_do_not_link_the_baseline_model(bench, repo, tmp_path):
    project = bench.make_project("baseline", 1, tmp_path / "work")
    assert not (project / "models" / "baseline").exists()  # it is what this row trains


def test_baseline_epochs_match_pdg_steps(bench, repo, tmp_path):
    # pdg: 400 pairs // 64 = 6 steps an epoch, baseline 300 // 64 = 4: 10 epochs of pdg = 15 of baseline
    assert _params(bench.make_project("baseline-pdg-steps", 0, tmp_path / "work"))["train"]["epochs"] == 15


def test_text_only_epochs_match_pdg_steps_on_the_original_pairs(bench, repo, tmp_path):
    # pdg's 10 epochs are 60 steps; text-only trains pdg's recipe on data/prepared's 4 steps an epoch
    params = _params(bench.make_project("text-only-pdg-steps", 0, tmp_path / "work"))
    assert params["variants"]["pdg"]["data"] == "data/prepared" and params["train"]["epochs"] == 15
    assert params["variants"]["pdg"]["online"]["mixup_prob"] == 0.0
    assert _params(repo)["variants"]["pdg"]["data"] == "data/pdg/train"  # the checkout's params untouched


def test_matching_without_a_manifest_names_it(bench, repo, tmp_path):
    manifest_path(repo / "data" / "pdg" / "train", "train").unlink()
    with pytest.raises(SystemExit, match="data/pdg/train.*missing"):
        bench.make_project("baseline-pdg-steps", 0, tmp_path / "work")


def _run(row: str, seed: int, r1: float, generator: str | None = None) -> dict:
    run = {"row": row, "seed": seed, "R1": r1, "R5": 2 * r1, "R10": 3 * r1, "mAP": r1 + 1, "mINP": r1 / 2,
           "best_val_R1": r1 + 5}
    return {**run, "generator": generator} if generator else run


def test_summary_is_mean_and_sample_std_and_the_table_gives_the_gain(bench):
    runs = [_run("baseline", s, r1) for s, r1 in enumerate((10.0, 12.0, 14.0))]
    runs += [_run("pdg", s, r1, "g") for s, r1 in enumerate((13.0, 15.0, 20.0))]
    rows = bench.summary(runs)
    assert rows["baseline"]["R1"] == {"mean": 12.0, "std": 2.0}
    assert rows["pdg"]["R1"]["mean"] == 16.0 and rows["pdg"]["R1"]["std"] == pytest.approx(3.605551, abs=1e-6)
    assert rows["pdg"]["seeds"] == [0, 1, 2]
    table = bench.markdown(rows)
    assert "| baseline | 0, 1, 2 | 12.00 ± 2.00 |" in table
    assert "PDG gain, test R1: +4.00 points" in table


def test_single_seed_rows_have_no_spread(bench):
    rows = bench.summary([_run("offline", 0, 11.5, "g")])
    assert rows["offline"]["R1"] == {"mean": 11.5, "std": 0.0}
    assert "| offline | 0 | 11.50 |" in bench.markdown(rows)


def test_runs_of_another_generator_are_dropped_but_baselines_kept(bench):
    runs = [_run("baseline", 0, 10.0), _run("pdg", 0, 12.0, "old"), _run("pdg", 1, 13.0, "new")]
    kept = bench.current_runs(runs, "new")
    assert [(r["row"], r["seed"]) for r in kept] == [("baseline", 0), ("pdg", 1)]


def test_a_results_file_of_something_else_is_refused(bench, tmp_path):
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"runs": [{"row": "no-such-row", "seed": 0}]}))
    with pytest.raises(SystemExit, match="unknown rows.*no-such-row"):
        bench.recorded_runs(out)
    out.write_text("{not json")
    with pytest.raises(SystemExit, match="not a results file"):
        bench.recorded_runs(out)
    assert bench.recorded_runs(tmp_path / "absent.json") == []


def test_matching_reads_params_as_the_stages_do(bench, repo, tmp_path):
    params = _params(repo)
    params["train"]["batch_sise"] = 64  # a typo: named, not a KeyError or a silent default
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit, match="unknown key 'train.batch_sise'"):
        bench.make_project("baseline-pdg-steps", 0, tmp_path / "work")
