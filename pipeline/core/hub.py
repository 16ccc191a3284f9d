"""Where pretrained weights come from: a local folder, or a hub id only as the params allow.

Every `from_pretrained` of the project passes `**pretrained_kwargs()`. By default that is
`local_files_only=True`. A hub id then loads from the local Hugging Face cache or fails, and
nothing reaches the network. `hub.allow_network: true` lets hub ids download. `hub.revision`
pins the branch, tag or commit every hub id loads, and local folders ignore it. The stages set the
process-wide access from their params once, at start (`pipeline.core.runtime.start_stage`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import HubConfig

_access = HubConfig()


def configure(cfg: HubConfig) -> None:
    global _access
    _access = cfg


def access() -> HubConfig:
    return _access


def pretrained_kwargs(name: str | Path | None = None) -> dict:
    """Keyword arguments for `from_pretrained(name, ...)`: offline unless allowed, the pinned revision
    for a hub id (a local folder has no revisions)."""
    kwargs: dict = {"local_files_only": not _access.allow_network}
    if _access.revision and not (name is not None and Path(name).is_dir()):
        kwargs["revision"] = _access.revision
    return kwargs


def looks_like_path(name: str) -> bool:
    """A value meant as a folder (absolute, relative with ./ or ../, or ~), not a hub id `org/name`."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or "\\" in name
