"""The canonical form: manifests and shards read back exactly, and are reproducible."""

import hashlib
import io
import json

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.data.canonical import (
    ImageRecord,
    RawRecord,
    assign_person_ids,
    iter_shard_samples,
    list_shards,
    read_manifest,
    write_manifest,
    write_shards,
)


def _images(root, count):
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(16, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.png")


def _records(count):
    return [
        ImageRecord(
            key=f"train-{i:06d}",
            person_id=i // 2,
            original_id=100 + i // 2,
            split="train",
            captions=[f"a person number {i}", "wearing a red coat"],
            image_path=f"img{i}.png",
            source="test",
            width=8,
            height=16,
            attributes=json.dumps({"upper_color": "red"}) if i % 2 else "",
        )
        for i in range(count)
    ]


def test_person_ids_are_contiguous_per_split_in_order_of_appearance():
    raw = [RawRecord(split, ["c"], f"{i}.png", pid, f"r{i}") for i, (split, pid) in
           enumerate([("train", 7), ("test", 7), ("train", 3), ("train", 7), ("train", 9)])]
    assert assign_person_ids(raw, "train") == {7: 0, 3: 1, 9: 2}
    assert assign_person_ids(raw, "test") == {7: 0}


def test_manifest_round_trip(tmp_path):
    records = _records(5)
    path = tmp_path / "m" / "train.parquet"
    write_manifest(records, path)
    assert read_manifest(path) == records
    assert [p.name for p in path.parent.iterdir()] == ["train.parquet"]  # no temp file left


def test_shards_hold_every_record_and_image_and_are_byte_reproducible(tmp_path):
    _images(tmp_path, 5)
    records = _records(5)
    paths = write_shards(records, tmp_path, tmp_path / "a", "train", shard_size=2)
    assert len(paths) == 3 and list_shards(tmp_path / "a", "train") == paths
    samples = list(iter_shard_samples(paths))
    assert [s["__key__"] for s in samples] == [r.key for r in records]
    for sample, record in zip(samples, records):
        assert json.loads(sample["json"]) == {**record.__dict__}
        assert sample["png"] == (tmp_path / record.image_path).read_bytes()

    again = write_shards(records, tmp_path, tmp_path / "b", "train", shard_size=2)
    digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    assert [digest(p) for p in paths] == [digest(p) for p in again]


def test_shards_stream_through_webdataset(tmp_path):
    _images(tmp_path, 3)
    records = _records(3)
    paths = write_shards(records, tmp_path, tmp_path / "out", "train", shard_size=10)
    dataset = wds.WebDataset(paths, shardshuffle=False, empty_check=False)
    decoded = [(s["__key__"], Image.open(io.BytesIO(s["png"])).size, json.loads(s["json"])["person_id"])
               for s in dataset]
    assert decoded == [(r.key, (8, 16), r.person_id) for r in records]


def test_an_image_format_the_shards_cannot_carry_is_written_as_png_and_counted(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from pipeline.data.canonical import ImageRecord, image_member, iter_shard_samples, write_split_shards

    pixels = np.random.default_rng(0).integers(0, 256, (16, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.bmp")
    record = ImageRecord("a", 0, 7, "train", ["a man"], "a.bmp", "cuhk-pedes", 8, 16)
    written = write_split_shards([record], tmp_path, tmp_path / "prepared", "train", 10)
    (sample,) = list(iter_shard_samples(written.paths))
    assert "png" in sample and "bmp" not in sample and written.converted_to_rgb == 1
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image_member(sample, "shard")))), pixels)
