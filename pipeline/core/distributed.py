"""How the processes of one launched run agree: one process decides, the others are told.

A stage may run under a launcher, set by `train.launcher` or `pdg.launcher` in params.yaml. The
launcher is torchrun or `accelerate launch`, with one process per GPU, on one node or several.
Such a stage makes each of these once, on the main process, and broadcasts the result:
- every decision that changes files (resume, start afresh, finished),
- every costly read (the data's content digest, the shard index).
No rank decides alone from its own view of the disk.

Before any of that, `check_shared_folder` makes sure every rank sees the same output folder.
Node-local disks would otherwise diverge silently. Stages that use one process refuse a launcher
with one line (`refuse_launcher`). They do not run N copies that race for one folder.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object

log = logging.getLogger(__name__)

T = TypeVar("T")

# The first collective waits for the main process's shard index and data digest (minutes for 150 GB
# read once, seconds when the digest cache knows the files) and for model loading: NCCL's default of
# 10 minutes would kill a healthy run at 1.5 M pairs; a dead rank is still found within the hour.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


class RankError(RuntimeError):
    """A failure on one process, as every process reports it (the message names the rank)."""


def world_size_from_env() -> int:
    """The launcher's process count (torchrun and accelerate launch set WORLD_SIZE); 1 without one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def rank_from_env() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def accelerator_for(cpu: bool, mixed_precision: str = "no") -> Accelerator:
    """An Accelerator whose process group waits PROCESS_GROUP_TIMEOUT for a collective."""
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)])


def on_main(accelerator: Accelerator, compute: Callable[[], T]) -> T:
    """`compute()` on the main process, its result (or its error) handed to every process.

    An exception on the main process is raised on every process. It has the same type where it can be
    rebuilt from its message, as the project's one-line errors can. Otherwise it is a RankError naming
    rank 0."""
    if accelerator.num_processes == 1:
        return compute()
    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            outcome[0] = ("ok", compute())
        except Exception as err:  # handed on: the other ranks would otherwise wait for the timeout
            outcome[0] = ("error", err.__class__, str(err))
    broadcast_object_list(outcome, from_process=0)
    if outcome[0][0] == "ok":
        return outcome[0][1]
    _, kind, message = outcome[0]
    try:
        error = kind(message)
    except Exception:
        error = RankError(f"rank 0: {kind.__name__}: {message}")
    raise error


def check_shared_folder(accelerator: Accelerator, folder: str | Path) -> None:
    """Every process must see the same `folder`: the main process writes a token file into it, and a
    process that cannot read it is named in one line (raised on every process)."""
    if accelerator.num_processes == 1:
        return
    folder = Path(folder)
    holder = [None, None]
    if accelerator.is_main_process:
        holder = [f".rank-check-{uuid.uuid4().hex}", str(folder)]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / holder[0]).write_text(socket.gethostname())
    broadcast_object_list(holder, from_process=0)
    sees = (folder / holder[0]).is_file()
    views = gather_object([(accelerator.process_index, socket.gethostname(), sees)])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / holder[0]).unlink(missing_ok=True)
    blind = [(rank, host) for rank, host, seen in views if not seen]
    if blind:
        ranks = ", ".join(f"rank {rank} on {host}" for rank, host in blind)
        raise RankError(f"{holder[1]}: {ranks} does not see the file rank 0 wrote there: every node must share "
                        "this folder (a network file system mounted at the same path), not a local disk")


def refuse_launcher(stage: str) -> str | None:
    """The one line for a single-process stage started under a launcher, or None."""
    world = world_size_from_env()
    if world <= 1:
        return None
    return (f"stage {stage} runs in one process, but was started under a launcher with WORLD_SIZE={world}: "
            f"run it as dvc.yaml does (python -m stages.{stage}); only train and generate take a launcher")
