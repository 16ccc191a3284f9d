"""The project's content-digest cache (pipeline/core/io.py, DigestCache): a file's contents are read once,
then known by (size, mtime_ns, inode); a same-size edit with a new mtime is read again; a cache file
that cannot be read is an empty cache, and concurrent writers never leave one that cannot be read.
The generator's weights are digested by content through it, so a copy without its mtimes is the
same generator."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest

import pipeline.core.io
from pipeline.core.io import DigestCache, files_digest, project_digest_cache, tree_digest
from pipeline.pdg.generate import weights_digest

MB = 1 << 20


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """The size of every file pipeline.core.io reads in full to digest it, in order."""
    sizes: list[int] = []
    real = pipeline.core.io.file_digest

    def counting(path):
        sizes.append(os.path.getsize(path))
        return real(path)

    monkeypatch.setattr(pipeline.core.io, "file_digest", counting)
    return sizes


def _aged(path: Path, seconds: float = 60.0) -> Path:
    """Give `path` an mtime `seconds` in the past: a file written now is "racy" and not remembered yet."""
    when = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(when, when))
    return path


def _write(path: Path, seed: int) -> Path:
    path.write_bytes(bytes([seed]) * (1000 + seed))
    return path


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def test_an_unchanged_10_mb_file_is_read_once_across_runs(tmp_path, reads):
    payload = os.urandom(10 * MB)
    (tmp_path / "train").mkdir()
    shard = tmp_path / "train" / "shard-000000.tar"
    shard.write_bytes(payload)
    _aged(shard)
    expected = [["train", "shard-000000.tar", hashlib.sha256(payload).hexdigest()]]  # the uncached format

    assert files_digest([shard], DigestCache(tmp_path / "digests")) == expected
    assert reads == [10 * MB]
    later = DigestCache(tmp_path / "digests")  # another process: the saved cache
    assert files_digest([shard], later) == expected and files_digest([str(shard)], later) == expected
    assert reads == [10 * MB] and later.hashed == 0  # two more digests, no byte read


def test_a_same_size_edit_with_a_new_mtime_is_read_again(tmp_path, reads):
    shard = tmp_path / "shard.tar"
    shard.write_bytes(b"\x00" * MB)
    _aged(shard, 60)
    cache = DigestCache(tmp_path / "digests")
    before = cache.digest(shard)
    cache.save()
    shard.write_bytes(b"\x01" * MB)  # same size, same inode
    _aged(shard, 59)  # a second later than the first version
    after = DigestCache(tmp_path / "digests").digest(shard)
    assert reads == [MB, MB]
    assert (before, after) == (hashlib.sha256(b"\x00" * MB).hexdigest(), hashlib.sha256(b"\x01" * MB).hexdigest())


def test_a_file_written_just_now_is_not_remembered(tmp_path, reads):
    """Within one mtime tick a rewrite keeps the stamp (same size, same mtime, same inode): the digest
    of a file younger than RACY_NS is never trusted, so the rewrite is still seen."""
    shard = tmp_path / "shard.tar"
    shard.write_bytes(b"\x00" * 1000)
    cache = DigestCache(tmp_path / "digests")
    first = cache.digest(shard)
    stamp = shard.stat().st_mtime_ns
    shard.write_bytes(b"\x01" * 1000)
    os.utime(shard, ns=(stamp, stamp))  # what a coarse clock does: the same mtime as the first write
    assert cache.digest(shard) == hashlib.sha256(b"\x01" * 1000).hexdigest() != first
    assert len(reads) == 2
    cache.save()
    assert not (tmp_path / "digests").exists()  # nothing worth saving yet


@pytest.mark.parametrize("damage", [b"", b'{"/data": [1, 2', b"\xff\xfe not json", b"[1, 2, 3]",
                                    b'{"%s": {"shard.tar": [1, 2]}}', b'{"%s": 7}'])
def test_a_cache_file_that_cannot_be_read_is_an_empty_cache(tmp_path, reads, damage):
    shard = _aged(_write(tmp_path / "shard.tar", 7))
    cache = DigestCache(tmp_path / "digests")
    truth = cache.digest(shard)
    cache.save()
    (bucket,) = (tmp_path / "digests").glob("*.json")
    bucket.write_bytes(damage.replace(b"%s", str(tmp_path).encode()))  # cut short, not JSON, wrong shapes
    again = DigestCache(tmp_path / "digests")
    assert again.digest(shard) == truth and again.hashed == 1
    again.save()  # and the next save repairs it
    assert json.loads(bucket.read_bytes()) == {str(tmp_path): {"shard.tar": [*_stamp(shard), truth]}}


def test_two_writers_of_one_bucket_keep_each_others_entries(tmp_path, reads):
    left, right = _aged(_write(tmp_path / "a.tar", 1)), _aged(_write(tmp_path / "b.tar", 2))
    first, second = DigestCache(tmp_path / "digests"), DigestCache(tmp_path / "digests")
    first.digest(left)
    second.digest(right)
    first.save()
    second.save()  # re-reads the bucket first: `first`'s entry stays
    third = DigestCache(tmp_path / "digests")
    third.digest(left), third.digest(right)
    assert third.hashed == 0 and len(reads) == 2


def _writer(folder: str, files: list[str], rounds: int) -> None:
    for _ in range(rounds):
        cache = DigestCache(folder)  # a fresh process-like cache each round: every round saves
        for path in files:
            cache.digest(path)
        cache.save()


def test_concurrent_writers_never_leave_a_cache_that_cannot_be_read(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    files = [str(_aged(_write(data / f"{i:03d}.tar", i))) for i in range(40)]
    folder = str(tmp_path / "digests")
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_writer, args=(folder, files[i::4], 30)) for i in range(4)]
    for writer in writers:
        writer.start()
    seen = 0
    while any(writer.is_alive() for writer in writers):
        for bucket in Path(folder).glob("*.json"):  # every read, mid-run, is whole JSON
            json.loads(bucket.read_bytes())
            seen += 1
    assert all(writer.join() or writer.exitcode == 0 for writer in writers)
    assert seen > 0 and not list(Path(folder).glob(".*.tmp-*"))
    final = DigestCache(folder)
    digests = [final.digest(path) for path in files]
    assert digests == [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in files]


def test_the_project_cache_persists_in_a_dvc_project_and_in_memory_elsewhere(tmp_path, monkeypatch, reads):
    shard = _aged(_write(tmp_path / "shard.tar", 3))
    bare = tmp_path / "bare"
    bare.mkdir()
    monkeypatch.chdir(bare)
    assert project_digest_cache().folder is None
    files_digest([shard]), files_digest([shard])
    assert len(reads) == 1 and not list(bare.rglob("*"))  # remembered in memory, nothing written

    project = tmp_path / "project"
    (project / ".dvc" / "tmp").mkdir(parents=True)
    monkeypatch.chdir(project)
    files_digest([shard])
    assert len(reads) == 2 and len(list((project / ".dvc" / "tmp" / "digests").glob("*.json"))) == 1


def test_a_model_folder_digest_keeps_its_value(tmp_path):
    """Unchanged model folders keep the digest the externals stage gave them before the cache."""
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "weights.safetensors").write_bytes(b"w" * 5000)
    (tmp_path / "config.json").write_text('{"a": 1}')
    lines = sorted(f"{name}\0{hashlib.sha256(Path(tmp_path, name).read_bytes()).hexdigest()}"
                   for name in ("unet/weights.safetensors", "config.json"))
    assert tree_digest(tmp_path, DigestCache()) == (hashlib.sha256("\n".join(lines).encode()).hexdigest(), 2)


def _generator(folder: Path) -> Path:
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(2 * MB))
    (folder / "unet" / "config.json").write_text('{"sample_size": 32}')
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / "README.md").write_text("not read by the generation")
    return folder


def test_a_copied_generator_without_its_mtimes_has_the_same_weights_digest(tmp_path, monkeypatch, reads):
    monkeypatch.chdir(tmp_path)  # outside a DVC project: the in-memory cache
    original = _generator(tmp_path / "sd")
    copy = Path(shutil.copytree(original, tmp_path / "copy", copy_function=shutil.copyfile))  # new mtimes
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_mtime_ns != (original / "unet" / weights.name).stat().st_mtime_ns
    assert weights.stat().st_ino != (original / "unet" / weights.name).stat().st_ino
    assert weights_digest(str(copy)) == weights_digest(str(original))
    assert weights_digest("org/some-model") == "org/some-model"

    (copy / "README.md").write_text("edited: not a weight file nor a config")
    assert weights_digest(str(copy)) == weights_digest(str(original))
    payload = bytearray(weights.read_bytes())
    payload[MB] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(payload))
    assert weights_digest(str(copy)) != weights_digest(str(original))


def test_the_weights_are_read_once_per_process_not_per_start(tmp_path, monkeypatch, reads):
    monkeypatch.chdir(tmp_path)
    original = _generator(tmp_path / "sd")
    for path in original.rglob("*"):
        if path.is_file():
            _aged(path)
    first = weights_digest(str(original))
    assert sorted(reads) == sorted([2 * MB, len('{"sample_size": 32}'), len('{"_class_name": "StableDiffusionPipeline"}')])
    assert weights_digest(str(original)) == first and len(reads) == 3


def test_a_cache_that_cannot_be_written_is_a_warning_not_an_error(tmp_path, caplog):
    shard = _aged(_write(tmp_path / "shard.tar", 5))
    (tmp_path / "blocked").write_text("a file where the cache folder would go")
    cache = DigestCache(tmp_path / "blocked" / "digests")
    assert files_digest([shard], cache)[0][2] == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert "not saved" in caplog.text and "the next run hashes again" in caplog.text
