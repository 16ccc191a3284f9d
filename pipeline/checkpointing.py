"""The resumable training state, in formats that cannot run code: tensors in safetensors, the rest JSON.

A state folder is models/<variant>/state (see pipeline/run_folder.py). It is a DVC output and may be
pulled from a shared remote. It holds these files:

    model.safetensors         the unwrapped model's weights
    optimizer.safetensors     the optimiser's tensors (moments, step counts) ...
    optimizer.json            ... and the rest of its state_dict, tensors named by reference
    scheduler.json            the LR schedule's state_dict
    scaler.json               the fp16 gradient scaler's state_dict (only when there is one)
    rng-<rank>.safetensors    each process's torch CPU (and CUDA) generator states ...
    rng-<rank>.json           ... and its python `random` and numpy states
    progress.json             the training loop's own record (`Progress`, below)

Nothing else is read, and nothing here is ever unpickled (no torch.load, no pickle).
Any other file in the folder is never opened. Examples are a planted custom_checkpoint_0.pkl,
optimizer.bin, random_states_0.pkl, or the rest of Accelerate's former layout. One warning line names
such files. The next save writes a whole new folder and so drops them.

Errors come in two kinds:
- A listed file that is missing or unreadable is a StateError naming it. `read_training_state` raises
  it before anything is applied. The trainer then logs that one line and starts afresh.
- A state that reads but does not fit the run is a StateError from `apply_training_state`. The stage
  reports it as its one error line. With a matching fingerprint this happens only if the files were
  altered.

Every rank writes its own RNG files, because ranks' generators may differ. A rank without one takes
rank 0's. That happens when the state was saved by fewer processes.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from pipeline.core.io import write_json_atomic, writing_file

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS, OPTIMIZER_FILE = "optimizer.safetensors", "optimizer.json"
SCHEDULER_FILE, SCALER_FILE, PROGRESS_FILE = "scheduler.json", "scaler.json", "progress.json"
FIXED_FILES = (MODEL_FILE, OPTIMIZER_TENSORS, OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE, PROGRESS_FILE)


class StateError(Exception):
    """A saved training state that cannot be read: the message names the file."""


@dataclass
class Progress:
    """What the training loop needs to resume, beyond the model's, optimiser's and RNGs' states. It is
    saved as progress.json and holds nothing measured on the clock (that is `Trainer.timing`)."""

    fingerprint: str
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    skipped_batches: int = 0
    best_epoch: int = -1
    best_score: float = -1.0
    losses: list = field(default_factory=list)  # [global_step, loss]
    epochs: list = field(default_factory=list)  # per-epoch records (val metrics)


def _rng_files(rank: int) -> tuple[str, str]:
    return f"rng-{rank}.safetensors", f"rng-{rank}.json"


# -- state_dict <-> (JSON tree, tensors) ---------------------------------------------------------
# Tensors become {"__tensor__": name}, tuples {"__tuple__": [...]}, dicts with keys that are not
# strings (the optimiser's per-parameter state) {"__items__": [[key, value], ...]}.

_MARKERS = ("__tensor__", "__tuple__", "__items__")


def _encode(value, path: str, tensors: dict[str, torch.Tensor]):
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not set(value) & set(_MARKERS):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in value.items()}
        return {"__items__": [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{path}: a {type(value).__name__} has no JSON form (the state is tensors and JSON only)")


def _decode(value, tensors: dict[str, torch.Tensor], where: str):
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        name = value["__tensor__"]
        if name not in tensors:
            raise StateError(f"{where}: refers to a tensor {name!r} that its .safetensors file does not hold")
        return tensors[name]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors, where) for v in value["__tuple__"])
    if "__items__" in value:
        return {k: _decode(v, tensors, where) for k, v in value["__items__"]}
    return {k: _decode(v, tensors, where) for k, v in value.items()}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with writing_file(path) as tmp:
        save_file(tensors, str(tmp))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StateError(f"{path}: missing from the saved state") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise StateError(f"{path}: not readable JSON ({err})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise StateError(f"{path}: missing from the saved state")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise StateError(f"{path}: not a readable safetensors file ({err})") from None


# -- RNG -----------------------------------------------------------------------------------------


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict, where: str) -> None:
    try:
        torch.set_rng_state(tensors["torch"])
        cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        version, internal, gauss = plain["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = plain["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise StateError(f"{where}: not a random-generator state ({err})") from None


# -- the state folder ----------------------------------------------------------------------------


def save_training_state(directory: Path, accelerator, model, optimizer, scheduler, progress: dict) -> None:
    """Write the state into `directory` (an existing, empty staging folder): collectively, every
    rank its RNG files, the main process the rest."""
    directory = Path(directory)
    rng_tensors, rng_plain = _rng_state()
    rng_tensors_file, rng_json_file = _rng_files(accelerator.process_index)
    _save_tensors(rng_tensors, directory / rng_tensors_file)
    write_json_atomic(directory / rng_json_file, rng_plain)
    if not accelerator.is_main_process:
        return
    save_model(accelerator.unwrap_model(model), str(directory / MODEL_FILE))
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(optimizer.state_dict(), "optimizer", tensors)
    _save_tensors(tensors, directory / OPTIMIZER_TENSORS)
    write_json_atomic(directory / OPTIMIZER_FILE, structure)
    write_json_atomic(directory / SCHEDULER_FILE, _encode(scheduler.state_dict(), "scheduler", {}))
    if accelerator.scaler is not None:
        write_json_atomic(directory / SCALER_FILE, _encode(accelerator.scaler.state_dict(), "scaler", {}))
    write_json_atomic(directory / PROGRESS_FILE, progress)


def read_progress(directory: Path, record_type):
    """The saved progress record as a `record_type` (a dataclass); None when the folder holds no state."""
    path = Path(directory) / PROGRESS_FILE
    if not path.is_file():
        return None
    try:
        return record_type(**_read_json(path))
    except TypeError as err:
        raise StateError(f"{path}: not a progress record ({err})") from None


def _is_rng_file(name: str) -> bool:
    stem, _, suffix = name.partition(".")
    return stem.startswith("rng-") and stem[4:].isdigit() and suffix in ("json", "safetensors")


def _warn_unknown_files(directory: Path) -> None:
    unknown = sorted(p.name for p in directory.iterdir() if p.name not in FIXED_FILES and not _is_rng_file(p.name))
    if unknown:
        log.warning("%s: ignoring %s (not part of a training state: never opened)", directory, ", ".join(unknown))


@dataclass
class SavedState:
    """A state folder read into memory and checked, not yet applied."""

    directory: Path
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng_tensors: dict[str, torch.Tensor]
    rng: dict
    rng_file: Path


def read_training_state(directory: Path, accelerator) -> SavedState:
    """Read every file of the state (StateError naming the first one missing or unreadable); nothing
    is applied yet, so a run that gets a StateError here is as it was, free to start afresh."""
    directory = Path(directory)
    _warn_unknown_files(directory)
    _read_tensors(directory / MODEL_FILE)  # readable; applied from the file by `load_model_weights`
    optimizer = _decode(_read_json(directory / OPTIMIZER_FILE), _read_tensors(directory / OPTIMIZER_TENSORS),
                        str(directory / OPTIMIZER_FILE))
    scheduler = _decode(_read_json(directory / SCHEDULER_FILE), {}, str(directory / SCHEDULER_FILE))
    scaler = None
    if accelerator.scaler is not None:
        scaler = _decode(_read_json(directory / SCALER_FILE), {}, str(directory / SCALER_FILE))
    tensors_file, json_file = _rng_files(accelerator.process_index)
    if not (directory / tensors_file).is_file():
        log.info("%s: no RNG state of rank %d: taking rank 0's", directory, accelerator.process_index)
        tensors_file, json_file = _rng_files(0)
    rng_tensors, rng = _read_tensors(directory / tensors_file), _read_json(directory / json_file)
    return SavedState(directory, optimizer, scheduler, scaler, rng_tensors, rng, directory / json_file)


def load_model_weights(directory: Path, accelerator, model) -> None:
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise StateError(f"{path}: missing from the saved state")
    try:
        load_model(accelerator.unwrap_model(model), str(path), strict=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise StateError(f"{path}: does not hold this model's weights ({err})") from None


def apply_training_state(saved: SavedState, accelerator, model, optimizer, scheduler) -> None:
    """Put the read state into the model, optimiser, schedule, scaler and generators; a StateError
    here (a state that does not fit this run) may leave them partly loaded."""
    load_model_weights(saved.directory, accelerator, model)
    targets = [(OPTIMIZER_FILE, optimizer, saved.optimizer), (SCHEDULER_FILE, scheduler, saved.scheduler)]
    if saved.scaler is not None:
        targets.append((SCALER_FILE, accelerator.scaler, saved.scaler))
    for name, target, state in targets:
        try:
            target.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise StateError(f"{saved.directory / name}: does not fit this run ({err})") from None
    _set_rng_state(saved.rng_tensors, saved.rng, str(saved.rng_file))
