"""Profiles: one command turns a checkout into the real recipe (or back), and every stage checks
the external inputs it reads before any work.

`python -m pipeline profile cuhk-pedes --data-root DIR --clip DIR --sd DIR [--captioner DIR]`
writes the profile's keys into params.yaml (comments kept), so DVC sees every one of them.
`python -m pipeline profile embedded` writes the embedded default's values of the same keys back.
The recipe follows the field's CLIP fine-tuning practice (IRRA, RDE, TBPS-CLIP) and the paper's
generation settings; the choices that could not be calibrated here are said in `docs/real-profile.md`.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

from pipeline.core import hub
from pipeline.core.config import ConfigError, Params, params_from_dict
from pipeline.core.io import write_bytes_atomic

REAL_SOURCES = ("cuhk-pedes", "icfg-pedes", "rstpreid")
PROFILES = (*REAL_SOURCES, "embedded")

# Every key a real profile sets, with the embedded default's value (params.yaml as shipped: a test
# checks that `profile embedded` leaves the committed params.yaml unchanged).
EMBEDDED = {
    "data": {"source": "synthpedes", "root": "", "annotations": "", "image_height": 64, "image_width": 32,
             "shard_size": 500, "permute_records": False},
    "synth": {"num_generator_ids": 0},
    "model": {"preset": "tiny", "embed_dim": 256, "max_text_length": 64, "vision_path": "", "text_path": "",
              "init_temperature": 0.005, "learn_temperature": False},
    "train": {"epochs": 10, "batch_size": 64, "lr": 0.0005, "head_lr": 0.0, "weight_decay": 0.05,
              "warmup_fraction": 0.2, "mixed_precision": "no", "num_workers": 1, "launcher": "python",
              "checkpoint_every": 100, "crop_padding": 4, "eval_batch_size": 256},
    "generator": {"pretrained": ""},
    "pdg": {"source_count": 200, "source_fraction": 1.0, "num_steps": 20, "guidance": 4.0, "canvas_height": 0,
            "canvas_width": 0, "precision": "auto", "inversion": "ddim", "null_text_steps": 0, "batch_size": 16,
            "shard_size": 64, "launcher": "python"},
    "filter": {"scorer": "models/baseline", "margin_level": 0.05, "similarity_level": 0.01, "calibration_pairs": 1000},
    "caption": {"captioner": ""},
}


def launcher_for(gpus: int) -> str:
    """train.launcher and pdg.launcher for `gpus` processes on this node (one per GPU)."""
    return "python" if gpus <= 1 else f"accelerate launch --multi_gpu --num_processes {gpus}"


def real_recipe(source: str, data_root: str, clip: str, sd: str, captioner: str = "", embed_dim: int = 512,
                gpus: int = 1) -> dict:
    """The keys of a real profile, for `gpus` GPUs on a node. Why each value: docs/real-profile.md."""
    launcher = launcher_for(gpus)
    return {
        "data": {"source": source, "root": data_root, "annotations": "", "image_height": 384, "image_width": 128,
                 "shard_size": 1000, "permute_records": True},
        "synth": {"num_generator_ids": 0},
        # CLIP's own projection (an error if embed_dim disagrees); temperature initialised at IRRA's 0.02
        "model": {"preset": "clip-vit-b16", "embed_dim": embed_dim, "max_text_length": 77, "vision_path": clip,
                  "text_path": clip, "init_temperature": 0.02, "learn_temperature": True},
        # IRRA's schedule: 60 epochs, lr 1e-5 for CLIP, 5x for what CLIP does not provide, 5 warm-up epochs
        "train": {"epochs": 60, "batch_size": 128, "lr": 1.0e-5, "head_lr": 5.0e-5, "weight_decay": 4.0e-5,
                  "warmup_fraction": 0.083, "mixed_precision": "auto", "num_workers": 8, "launcher": launcher,
                  "checkpoint_every": 500, "crop_padding": 10, "eval_batch_size": 512},
        "generator": {"pretrained": sd},
        # every training image a source; 50 DDIM steps at guidance 7.5; negative-prompt inversion (no
        # optimisation; null-text costs about 7x, see the cost table); a canvas that fits a person crop
        "pdg": {"source_count": 0, "source_fraction": 1.0, "num_steps": 50, "guidance": 7.5, "canvas_height": 512,
                "canvas_width": 192, "precision": "auto", "inversion": "negative-prompt", "null_text_steps": 0,
                "batch_size": 8, "shard_size": 256, "launcher": launcher},
        # the same levels as the embedded default: the filter stage calibrates the thresholds on CLIP's own
        # cosines over real training pairs (pipeline/pdg/calibration.py, metrics/filter.json)
        "filter": {"scorer": clip, "margin_level": 0.05, "similarity_level": 0.01, "calibration_pairs": 1000},
        "caption": {"captioner": captioner},
    }


def clip_projection_dim(path: str) -> int | None:
    """projection_dim of a local CLIP folder's config.json (None where there is none to read: the
    folder check then names what is wrong with it)."""
    try:
        return int(json.loads((Path(path) / "config.json").read_text()).get("projection_dim", 512))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _profiled(params_file: str | Path, updates: dict):
    """(the YAML round-tripper, params_file's document with `updates` laid in, the result validated);
    ConfigError naming the file when it cannot be read or parsed, or the key a value breaks."""
    from ruamel.yaml import YAML, YAMLError

    path = Path(params_file)
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.representer.add_representer(float, _represent_float)
    try:
        document = yaml.load(path.read_text())
    except OSError as err:
        raise ConfigError(f"params: cannot read {path}: {err.strerror or err}") from None
    except YAMLError as err:
        raise ConfigError(f"params: {path} is not valid YAML: {err}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"params: {path} must hold a mapping of sections")
    for section, values in updates.items():
        target = document.setdefault(section, {})
        for key, value in values.items():
            target[key] = value
    return yaml, document, params_from_dict(json.loads(json.dumps(_plain(document))))


def apply_profile(params_file: str | Path, updates: dict) -> Params:
    """Writes `updates` (section -> key -> value) into params_file, keeping its comments and order;
    the result is validated first, so a bad profile never reaches the file."""
    path = Path(params_file)
    yaml, document, params = _profiled(path, updates)
    buffer = io.StringIO()
    yaml.dump(document, buffer)
    write_bytes_atomic(path, buffer.getvalue().encode("utf-8"))
    return params


def _represent_float(representer, value: float):
    """Floats PyYAML (YAML 1.1, the stages' reader) also reads as floats: 1e-05 would be a string there."""
    text = repr(value)
    mantissa, _, exponent = text.partition("e")
    if exponent and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _plain(node):
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


# ------------------------------------------------------------------ checks before any work

# The external inputs each stage reads (params keys naming folders outside the repository).
STAGE_INPUTS = {
    "prepare": ("data.root",),
    "train": ("model.vision_path", "model.text_path"),
    "train_generator": ("generator.pretrained",),
    "generate": ("generator.pretrained",),
    "filter": ("filter.scorer",),
    "caption": ("caption.captioner",),
}
ALL_INPUTS = tuple(dict.fromkeys(key for keys in STAGE_INPUTS.values() for key in keys))

# What a folder named by each key must hold.
_REQUIRED_FILES = {
    "model.vision_path": ("config.json",),
    "model.text_path": ("config.json",),
    "generator.pretrained": ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                             "tokenizer", "scheduler/scheduler_config.json"),
    "filter.scorer": ("config.json",),
    "caption.captioner": ("config.json",),
}


def _value(params: Params, key: str) -> str:
    section, name = key.split(".")
    return getattr(getattr(params, section), name)


def check_inputs(params: Params, keys: tuple[str, ...] = ALL_INPUTS) -> list[str]:
    """One line per problem with an external input, each naming its key; [] when all is well."""
    problems = []
    for key in keys:
        if key == "data.root":
            problems += _check_data_root(params)
            continue
        if key.startswith("model.") and params.model.preset == "tiny":
            continue
        value = _value(params, key)
        if key == "filter.scorer" and value.startswith("models/"):
            continue  # a model this project trains: the filter stage checks it is there
        if not value:
            if key.startswith("model."):
                problems.append(f"params: '{key}' is empty, but model.preset {params.model.preset} loads a checkpoint")
            continue
        problem = _check_folder(key, value) if Path(value).is_dir() or hub.looks_like_path(value) else _check_hub_id(key, value, params)
        if problem:
            problems.append(problem)
    if "model.vision_path" in keys and params.model.preset == "clip-vit-b16" and params.model.vision_path:
        dim = clip_projection_dim(params.model.vision_path)
        if dim is not None and dim != params.model.embed_dim:
            problems.append(f"params: 'model.embed_dim' is {params.model.embed_dim}, but the CLIP checkpoint "
                            f"{params.model.vision_path} projects to {dim}: set model.embed_dim: {dim}")
    return problems


def _check_folder(key: str, value: str) -> str | None:
    folder = Path(value).expanduser()
    if not folder.is_dir():
        return f"params: '{key}' {value}: no such folder"
    if not os.access(folder, os.R_OK | os.X_OK):
        return f"params: '{key}' {value}: the folder is not readable"
    for name in _REQUIRED_FILES.get(key, ()):
        member = folder / name
        if not member.exists():
            return f"params: '{key}' {value}: no {name} in it (not a {_KIND[key]} folder)"
        if not os.access(member, os.R_OK):
            return f"params: '{key}' {value}: {name} is not readable"
        if member.suffix == ".json":
            try:
                json.loads(member.read_text())
            except ValueError as err:
                return f"params: '{key}' {value}: {name} is not valid JSON ({err})"
    return None


_KIND = {"model.vision_path": "transformers model", "model.text_path": "transformers model",
         "generator.pretrained": "Stable Diffusion (diffusers) pipeline", "filter.scorer": "CLIP model",
         "caption.captioner": "image-to-text model"}


def _check_hub_id(key: str, value: str, params: Params) -> str | None:
    if not re.fullmatch(r"[0-9a-f]{40}", params.hub.revision):
        given = f"is {params.hub.revision!r}, not a commit hash" if params.hub.revision else "is empty"
        return (f"params: '{key}' {value} is a hub id, but hub.revision {given}: pin the commit it loads "
                f"(40 hex digits; a branch or tag moves, and DVC would not see the weights change)")
    if params.hub.allow_network:
        return None
    from huggingface_hub import try_to_load_from_cache

    marker = "model_index.json" if key == "generator.pretrained" else "config.json"
    try:
        cached = try_to_load_from_cache(value, marker, revision=params.hub.revision or None)
    except Exception:  # not a valid repo id either
        return f"params: '{key}' {value}: no such folder, and not a hub id"
    if isinstance(cached, str):
        return None
    return (f"params: '{key}' {value} is a hub id, hub.allow_network is false and it is not in the local cache: "
            f"give a local folder, or set hub.allow_network: true")


def _check_data_root(params: Params) -> list[str]:
    if params.data.source == "synthpedes":
        return []
    from pipeline.data.sources import LAYOUTS, UnusableInput, _annotation_file

    root = Path(params.data.root)
    if not params.data.root:
        return [f"params: 'data.root' is empty, but data.source {params.data.source} reads a download"]
    if not root.is_dir():
        return [f"params: 'data.root' {params.data.root}: no such folder"]
    try:
        _annotation_file(LAYOUTS[params.data.source], root, params.data.annotations or None)
    except UnusableInput as err:
        return [f"params: 'data.root' {params.data.root} has no annotation file of {params.data.source}: {err}"]
    return []


def check_stage_inputs(params: Params, stage: str) -> None:
    """Raises ConfigError with every problem of the stage's external inputs (one line each)."""
    problems = check_inputs(params, STAGE_INPUTS.get(stage, ()))
    if problems:
        raise ConfigError("\n".join(problems))


# ------------------------------------------------------------------ the command


def profile_command(name: str, params_file: str, data_root: str | None, clip: str | None, sd: str | None,
                    captioner: str | None, check: bool = True, gpus: int = 1) -> int:
    if name == "embedded":
        updates = EMBEDDED
    else:
        missing = [flag for flag, value in (("--data-root", data_root), ("--clip", clip), ("--sd", sd)) if not value]
        if missing:
            print(f"profile {name}: {', '.join(missing)} required")
            return 2
        dim = clip_projection_dim(clip) or 512
        updates = real_recipe(name, data_root, clip, sd, captioner or "", dim, gpus)
    try:
        _, _, params = _profiled(params_file, updates)
    except ConfigError as err:
        print(err)
        return 1
    problems = check_inputs(params) if check else []
    for problem in problems:
        print(problem)
    if problems:
        print(f"{params_file} left unchanged (--no-check writes the profile anyway)")
        return 1
    apply_profile(params_file, updates)
    changed = sum(len(values) for values in updates.values())
    print(f"{params_file}: profile {name} ({changed} keys); `dvc status` shows what reruns, `dvc repro` runs it")
    return 0
