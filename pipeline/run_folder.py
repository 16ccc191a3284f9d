"""A resumable, fingerprinted output folder: whose work a folder holds, and how far it got.

Training (models/<variant>) and generation (data/pdg/raw) write hours of work into a folder. A kill,
a requeue or a changed configuration may find that folder half done. One set of rules serves both.

- A run is named by its `fingerprint`. The fingerprint covers what defines the run: the params that
  change what it makes, the contents of its data, and its code. It never covers how the run was
  executed (threads, processes, launcher, loader workers, batch split).
- Work of another fingerprint is started afresh. Work of this one is continued, or kept when finished.
- Every write is a whole-folder swap (pipeline/core/io.py). So a kill leaves the old version or the new.
- The main process decides and writes. Under a launcher, the others are told
  (pipeline/core/distributed.py).

Training keeps `state/`, the newest resumable state. It is in pipeline/checkpointing.py's format, and
its progress record carries the fingerprint. Training also keeps its models `best/` and `last/`, each
marked with the fingerprint and epoch it holds. Generation marks the folder itself (`run.json`), and
its finished shards are its progress.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

from pipeline.core.io import (recover_directory, remove_directory, replace_directory, staging_path, start_directory,
                              write_json_atomic)

log = logging.getLogger(__name__)

MODEL_MARKER = "training.json"  # in best/ and last/: {"epoch", "fingerprint"}
FOLDER_MARKER = "run.json"  # in a folder whose files are the progress: {"fingerprint", "definition"}


def model_epoch(folder: str | Path) -> int | None:
    """The epoch a model folder that training wrote (best/ or last/) holds; None for another folder."""
    try:
        return json.loads((Path(folder) / MODEL_MARKER).read_text())["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fingerprint(definition: dict) -> str:
    """16 hex digits of sha256 over the key-sorted JSON of what defines a run."""
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]


class RunFolder:
    """A training run's folder: `state/`, the resumable state, and the models `best/` and `last/`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def last(self) -> Path:
        return self.root / "last"

    def recover(self) -> None:
        """Undo what a kill inside a folder swap left (pipeline/core/io.py)."""
        for directory in (self.state_dir, self.best, self.last):
            recover_directory(directory)

    def clear_state(self) -> None:
        """Remove state/ for a fresh run. best/ and last/ stay until the new run's own replace them
        (best/ after its first epoch, last/ at its end): a run that fails loses nothing."""
        remove_directory(self.state_dir)

    def holds(self, directory: Path, run: str, epoch: int) -> bool:
        """Whether the model folder `directory` holds run `run`'s model of `epoch` (not one of an earlier
        configuration, which a fresh run leaves in place until it replaces it)."""
        try:
            saved = json.loads((directory / MODEL_MARKER).read_text())
        except (OSError, ValueError):
            return False
        return saved.get("fingerprint") == run and saved.get("epoch") == epoch

    def save_state(self, accelerator, write: Callable[[Path], None]) -> None:
        """Collective: `write(staging)` on every process into the main process's fresh staging folder,
        then swapped in for the previous state/."""
        self._on_main(accelerator, lambda: start_directory(self.state_dir))
        write(staging_path(self.state_dir))
        self._on_main(accelerator, lambda: replace_directory(staging_path(self.state_dir), self.state_dir))

    def save_model(self, accelerator, directory: Path, write: Callable[[Path], None], run: str, epoch: int) -> None:
        """Collective: the main process writes a model folder (`write(staging)`) marked as run `run`'s
        model of `epoch`, swapped in whole."""
        def save() -> None:
            staging = start_directory(directory)
            write(staging)
            write_json_atomic(staging / MODEL_MARKER, {"epoch": epoch, "fingerprint": run})
            replace_directory(staging, directory)

        self._on_main(accelerator, save)

    @staticmethod
    def _on_main(accelerator, action: Callable[[], object]) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            action()
        accelerator.wait_for_everyone()


def reuse_or_start(folder: str | Path, definition: dict) -> bool:
    """Reuse or start a folder whose files are the progress, such as generation's shards.

    The folder is reused when its marker names this definition. Leftover temporary files of a killed
    writer are then removed. Otherwise an empty folder with the new marker is swapped in. Returns True
    when reused. For the main process alone."""
    folder = Path(folder)
    marker = {"fingerprint": fingerprint(definition), "definition": definition}
    recover_directory(folder)
    try:
        reused = json.loads((folder / FOLDER_MARKER).read_text()) == marker
    except (OSError, ValueError):
        reused = False
    if reused:
        for leftover in folder.glob(".*.tmp-*"):
            leftover.unlink()
        return True
    if folder.exists():
        log.info("%s holds work of another configuration: starting afresh", folder)
    staging = start_directory(folder)
    write_json_atomic(staging / FOLDER_MARKER, marker)
    replace_directory(staging, folder)
    return False
