"""The training loader: each pair's bytes read once an epoch across ranks and workers, a resume reads
nothing before its step, and a broken shard is one line."""

from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.core.config import params_from_dict
from pipeline.data import loader
from pipeline.data.canonical import list_shards
from pipeline.data.loader import ContrastivePairs, StreamPlan, build_shard_index
from pipeline.data.prepare import prepare
from pipeline.core.io import BrokenArtifact
from pipeline.models.preprocessing import ImagePreprocessor
from tiny_project import TINY_PROFILE, deep_merge

SMALL = {"data": {"image_height": 32, "image_width": 16, "shard_size": 8}}


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    prepared = tmp_path_factory.mktemp("prepared")
    prepare(params_from_dict(deep_merge(TINY_PROFILE, SMALL)), prepared)
    return build_shard_index(list_shards(prepared, "train"))


def _tokenize(captions):
    import torch

    ids = torch.tensor([[len(word) for word in (c.split() + [""] * 8)[:8]] for c in captions])
    return {"input_ids": ids, "attention_mask": ids > 0}


def _pair_bytes(index, pairs) -> int:
    samples, _ = index.locate(np.asarray(pairs))
    return int((index.image_span[samples, 1] + index.json_span[samples, 1]).sum())


def _run(index, monkeypatch, world, workers, start_step=0, batches=None):
    """Per (rank, worker): the steps it yields and the bytes it read."""
    runs = {}
    for rank in range(world):
        for worker in range(workers):
            monkeypatch.setattr(loader, "get_worker_info", lambda w=worker: SimpleNamespace(id=w, num_workers=workers))
            plan = StreamPlan(8, seed=3, start_step=start_step, rank=rank, world_size=world)
            dataset = ContrastivePairs(plan, index, ImagePreprocessor(32, 16), _tokenize)
            steps = []
            for batch in dataset:
                steps.append(batch["step"])
                if batches is not None and len(steps) == batches:
                    break
            runs[rank, worker] = (steps, dataset.bytes_read)
    return runs


def test_an_epoch_reads_each_pair_once_across_ranks_and_workers(index, monkeypatch):
    steps = index.num_pairs // 8
    assert index.num_pairs == 16 * 2 * 2 and steps == 8  # ids x images x captions
    permutation = StreamPlan(8, seed=3).permutation(index)
    expected = _pair_bytes(index, permutation[: steps * 8])
    for world, workers in ((1, 1), (2, 1), (2, 2), (4, 2)):
        runs = _run(index, monkeypatch, world, workers)
        for rank in range(world):  # every rank takes every step, once, through one of its workers
            assert sorted(s for (r, _), (seen, _) in runs.items() if r == rank for s in seen) == list(range(steps))
        assert sum(read for _, read in runs.values()) == expected, (world, workers)


def test_a_resume_reads_nothing_before_its_step(index, monkeypatch):
    runs = _run(index, monkeypatch, world=2, workers=1, start_step=5, batches=1)
    permutation = StreamPlan(8, seed=3).permutation(index)
    for rank in range(2):
        steps, read = runs[rank, 0]
        assert steps == [5]
        assert read == _pair_bytes(index, permutation[5 * 8 + rank * 4 : 5 * 8 + rank * 4 + 4])


def test_a_truncated_shard_is_one_line_naming_it(tmp_path, index):
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(open(index.shards[0], "rb").read()[:1500])
    with pytest.raises(BrokenArtifact, match=r"train-000000.tar: not a readable tar shard .*rerun the stage") as err:
        build_shard_index([str(shard)])
    assert "\n" not in str(err.value)


def test_the_header_scanner_agrees_with_tarfile_and_hands_other_tars_to_it(tmp_path, index):
    import tarfile

    source = index.shards[0]
    pax = tmp_path / "train-000000.tar"  # the same members, written with pax headers: read by tarfile
    with tarfile.open(source) as tar, tarfile.open(pax, "w", format=tarfile.PAX_FORMAT) as out:
        for member in tar:
            out.addfile(member, tar.extractfile(member))
    plain, other = build_shard_index([source]), build_shard_index([str(pax)])
    with tarfile.open(source) as tar:
        spans = {m.name: [m.offset_data, m.size] for m in tar}
    assert [spans[f"{key}.json"] for key in plain.keys] == plain.json_span.tolist()
    assert list(plain.keys) == list(other.keys) and plain.person_id.tolist() == other.person_id.tolist()
    assert plain.first_pair.tolist() == other.first_pair.tolist() and plain.num_bytes == other.num_bytes

    damaged = tmp_path / "damaged" / "train-000000.tar"
    damaged.parent.mkdir()
    payload = bytearray(open(source, "rb").read())
    payload[0] ^= 0x20  # the first header's name: its checksum no longer matches
    damaged.write_bytes(bytes(payload))
    with pytest.raises(BrokenArtifact, match=r"not a readable tar shard \(bad header checksum at byte 0\)"):
        build_shard_index([str(damaged)])
