"""The real profile end to end at real architecture sizes, through real DVC (slow tier).

`python -m pipeline profile cuhk-pedes` on a project copy, with random weights in a CLIP ViT-B/16
folder (the real CLIP vocabulary), a Stable Diffusion 1.5 folder and a BLIP-base captioner, on the
32 real CUHK-PEDES crops of the shared fixtures; then every stage by `dvc repro --single-item`, in
DAG order, each checked by its outputs and measured (wall time, peak memory, UNet evaluations).
Only the sizes that make it finish on 2 cores are turned down: 1 epoch of batch 8, one source with
2 edits at 2 DDIM steps, a short caption. What it cannot catch: anything that depends on trained
weights (edit quality, filter thresholds, retrieval accuracy), NCCL collectives, out-of-memory at
full batch on a GPU.

Set TBPS_REAL_SHAPES_REPORT=FILE to write the measurements as JSON.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline.data.canonical import iter_shard_samples, manifest_path, read_manifest
from tiny_project import FIXTURES, assert_calibrated, deep_merge, make_tiny_project, require_fixture, stale_stages

pytestmark = pytest.mark.slow

STAGES = ("externals", "prepare", "train@baseline", "evaluate@baseline", "train_generator", "generate", "filter", "caption",
          "train@pdg", "evaluate@pdg", "index@baseline", "index@pdg")

# What keeps the run short on 2 cores; everything else is the profile's.
SHORT = {
    "train": {"epochs": 1, "batch_size": 8, "num_workers": 0, "eval_batch_size": 16},
    "generator": {"sample_steps": 1},
    "pdg": {"source_count": 1, "num_samples": 2, "num_steps": 2, "batch_size": 2, "shard_size": 2, "sheet_samples": 2},
    # random weights make random scores: keep every pair so that each later stage has work
    "filter": {"enabled": False, "calibration_pairs": 10, "sheet_samples": 2, "batch_size": 8},
    "caption": {"captioner_max_tokens": 6, "batch_size": 2},
    "variants": {"pdg": {"online": {"embedding_neighbours": False}}},
}


def _cuhk_mini() -> Path:
    return require_fixture(FIXTURES / "cuhk-pedes-mini" / "reid_raw.json").parent


def _run_stage(project: Path, stage: str) -> dict:
    """`dvc repro --single-item STAGE`, timed; peak memory of the largest process it waited for."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    started = time.perf_counter()
    process = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro", "--single-item", stage],
                               cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, f"dvc repro {stage} failed:\n{output[-6000:]}"
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    data_root = _cuhk_mini()
    weights = tmp_path_factory.mktemp("weights")
    started = time.perf_counter()
    folders = {"clip": weights / "clip-vit-base-patch16", "sd": weights / "sd-v1-5", "captioner": weights / "blip-base"}
    # built in a child process: the weights would otherwise stay in this one's memory, and every stage
    # forked from it would start its peak-memory count there
    build = (f"from pathlib import Path; from real_shapes import *; save_clip_vit_b16(Path({str(folders['clip'])!r})); "
             f"save_sd15(Path({str(folders['sd'])!r})); save_blip_base(Path({str(folders['captioner'])!r}))")
    subprocess.run([sys.executable, "-c", build], cwd=Path(__file__).parent, check=True, capture_output=True)
    build_seconds = time.perf_counter() - started
    project = make_tiny_project(tmp_path_factory.mktemp("real") / "project")
    command = [sys.executable, "-m", "pipeline", "profile", "cuhk-pedes", "--data-root", str(data_root),
               "--clip", str(folders["clip"]), "--sd", str(folders["sd"]), "--captioner", str(folders["captioner"])]
    switched = subprocess.run(command, cwd=project, capture_output=True, text=True)
    assert switched.returncode == 0, switched.stdout + switched.stderr
    params_file = project / "params.yaml"
    params_file.write_text(yaml.safe_dump(deep_merge(yaml.safe_load(params_file.read_text()), SHORT), sort_keys=False))
    measured = {stage: _run_stage(project, stage) for stage in STAGES}
    generated = {**json.loads((project / "metrics" / "generate.json").read_text()),
                 **json.loads((project / "reports" / "pdg" / "timing.json").read_text())}
    measured["generate"]["unet_evaluations"] = generated["unet_evaluations_measured"]
    report = {"build_seconds": round(build_seconds, 1), "stages": measured, "generate": generated}
    if os.environ.get("TBPS_REAL_SHAPES_REPORT"):
        Path(os.environ["TBPS_REAL_SHAPES_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
    return project, folders, report


def _metrics(project: Path, name: str) -> dict:
    return json.loads((project / "metrics" / f"{name}.json").read_text())


def test_prepare_and_the_clip_baseline_at_real_shapes(real_run):
    project, _, _ = real_run
    data = _metrics(project, "data")
    train_rows = read_manifest(manifest_path(project / "data" / "prepared", "train"))
    assert len(train_rows) == 20 and data["splits"]["test"]["images"] == 8
    assert _metrics(project, "train_baseline")["steps"] == 5  # 40 training pairs in batches of 8
    saved = json.loads((project / "models" / "baseline" / "best" / "dual_encoder.json").read_text())
    assert saved["image_size"] == [384, 128] and saved["model"]["embed_dim"] == 512
    assert saved["vision_config"]["patch_size"] == 16 and saved["vision_config"]["hidden_size"] == 768
    baseline = _metrics(project, "baseline")
    # 8 gallery images: every query finds its person within the top 10, whatever the (random) weights
    assert baseline["num_queries"] == 16 and baseline["num_gallery"] == 8 and baseline["R10"] == 100.0


def test_pretrained_generator_edits_on_a_person_canvas_at_the_formula_s_cost(real_run):
    project, folders, report = real_run
    assert Image.open(project / "reports" / "generator" / "samples.png").size[0] > 0
    assert Image.open(project / "reports" / "generator" / "loss_curves.png").size[0] > 0
    generated = report["generate"]
    assert generated["samples"] == 2
    assert generated["unet_evaluations_measured"] == generated["unet_evaluations_planned"]
    samples = list(iter_shard_samples(sorted(str(p) for p in (project / "data" / "pdg" / "raw").glob("pdg-*.tar"))))
    assert len(samples) == 2
    record = json.loads(samples[0]["json"])
    source = next(r for r in read_manifest(manifest_path(project / "data" / "prepared", "train")) if r.key == record["source_key"])
    import io

    assert Image.open(io.BytesIO(samples[0]["png"])).size == (source.width, source.height)  # back at the crop's size
    assert record["params"]["inversion"] == "negative-prompt" and record["params"]["canvas_height"] == 512


def test_clip_filter_blip_captions_and_the_pdg_variant(real_run):
    project, _, _ = real_run
    filtered = _metrics(project, "filter")
    assert filtered["pairs_in"] == 2 and filtered["kept"] == 2
    assert_calibrated(filtered["calibration"], most_pairs=10)  # on CLIP's cosines, at real shapes
    captioned = _metrics(project, "caption")
    assert captioned["proximity_images"] == 2 and captioned["captioner"].endswith("blip-base")
    rows = read_manifest(manifest_path(project / "data" / "pdg" / "train", "train"))
    assert len(rows) == 22
    assert _metrics(project, "train_pdg")["steps"] >= 5
    assert _metrics(project, "pdg")["num_queries"] == 16
    assert stale_stages(project) == {}
