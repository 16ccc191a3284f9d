"""PDG shards by name, and the source images they were made from (what generate, filter and
caption share, apart from generation itself)."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.canonical import image_member, iter_shard_samples, list_shards

SHARD_NAME = "pdg-%06d.tar"  # PDG shards (raw and filtered)


def pdg_shards(folder: str | Path) -> list[str]:
    """The PDG shards of a folder, in order."""
    return sorted(str(path) for path in Path(folder).glob("pdg-*.tar"))


def load_source_images(prepared_dir: str | Path, keys: set[str]) -> dict[str, bytes]:
    """The encoded train images of `keys`, from the prepared train shards."""
    images = {}
    for sample in iter_shard_samples(list_shards(prepared_dir, "train")):
        if sample["__key__"] in keys:
            images[sample["__key__"]] = image_member(sample, "train shards")
    missing = keys - set(images)
    if missing:
        raise FileNotFoundError(f"{len(missing)} source images are not in the train shards, e.g. {sorted(missing)[0]}")
    return images
