"""The training loader at scale: bytes read, pairs/s and resume cost at world sizes 1, 2, 4 (gloo).

    python benchmarks/bench_scale.py make --images 100000            # 200,000 pairs in shards, /tmp/bench_scale
    python benchmarks/bench_scale.py loader --code after              # this checkout's loader
    git worktree add /tmp/before <commit>                             # the loader before the change ...
    python benchmarks/bench_scale.py loader --code before --code-root /tmp/before
    python benchmarks/bench_scale.py spread                           # identity spread at CUHK-PEDES size
    python benchmarks/bench_scale.py decode                           # a worker's cost per pair at 384x128
    python benchmarks/bench_scale.py project                          # the table of docs/scale.md

Each run starts `torchrun --standalone --nproc_per_node R`; every rank runs the loader of `--code-root`
(its `pipeline.data.loader`, old stream API or shard-index API) with N workers, as the trainer does:
- bytes read: over a whole epoch, the real dataset in real DataLoader workers with decoding left out
  (each worker reports its /proc/self/io `rchar`, every read() it made: page cache included);
- pairs/s: `--steps` global batches with decoding and augmentation, all ranks together (wall clock);
- resume: a loader started at the middle of the epoch, time to its first batch (the shard index
  built first where the code has one: a restarted trainer builds it too).
Rows merge into benchmarks/results/scale.json's `loader` list (other keys are other benchmarks').
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from scale_results import merge_rows  # benchmarks/ is on sys.path when a benchmark runs as a script

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "scale.json"
DATA = Path("/tmp/bench_scale")


def make(args) -> None:
    """`--images` JPEGs of 32x16 in shards of 1,000, two captions each, identities in annotation
    order (4 images an identity), as the canonical writer lays them out."""
    sys.path.insert(0, str(REPO))
    from PIL import Image

    from pipeline.data.canonical import write_tar_atomic

    rng = np.random.default_rng(0)
    shards = args.data / "shards"
    for start in range(0, args.images, 1000):
        samples = []
        for i in range(start, min(start + 1000, args.images)):
            pixels = rng.integers(0, 255, (32, 16, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            row = {"key": f"train-{i:07d}", "person_id": i // 4,
                   "captions": [f"person {i // 4} wears a red jacket, view {i % 4}", f"a pedestrian number {i}"]}
            samples.append({"__key__": row["key"], "jpg": buffer.getvalue(), "json": json.dumps(row).encode()})
        write_tar_atomic(shards / f"train-{start // 1000:06d}.tar", samples)
    print(f"{args.images} images, {2 * args.images} pairs, "
          f"{sum(p.stat().st_size for p in shards.glob('*.tar')) / 2**20:.0f} MiB in {shards}")


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def _rank(args) -> None:
    """One rank of a run (started by torchrun): its loader, measured; results gathered on rank 0."""
    sys.path.insert(0, str(args.code_root))
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, IterableDataset

    from pipeline.data import loader as L
    from pipeline.models.preprocessing import ImagePreprocessor

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shards = sorted(str(p) for p in (args.data / "shards").glob("*.tar"))
    indexed = hasattr(L, "build_shard_index")
    preprocessor = ImagePreprocessor(32, 16)

    def tokenize(captions):  # fixed-size ids: the loader's cost, not a tokenizer's
        ids = torch.tensor([[hash(w) % 1000 for w in (c.split() + [""] * 16)[:16]] for c in captions])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def dataset(start_step: int, index=None):
        if indexed:
            plan = L.StreamPlan(args.batch, seed=0, start_step=start_step, rank=rank, world_size=world)
            return L.ContrastivePairs(plan, index, preprocessor, tokenize)
        plan = L.StreamPlan(tuple(shards), args.batch, seed=0, start_step=start_step, rank=rank, world_size=world,
                            shuffle_buffer=args.buffer)
        return L.ContrastivePairs(plan, preprocessor, tokenize)

    class Reads(IterableDataset):
        """The real dataset, its batches not decoded; each worker reports its bytes read at the end."""

        def __init__(self, inner):
            self.inner = inner
            inner.collate = lambda step, pairs: {"step": step}

        def __iter__(self):
            before = _rchar()
            yield from self.inner
            yield {"rchar": _rchar() - before}

    started = time.perf_counter()
    index = L.build_shard_index(shards) if indexed else None
    index_s = time.perf_counter() - started
    loader_args = dict(batch_size=None, num_workers=args.workers)
    started = time.perf_counter()
    read = sum(b.get("rchar", 0) for b in DataLoader(Reads(dataset(0, index)), **loader_args))
    read_s = time.perf_counter() - started
    dist.barrier()
    started = time.perf_counter()
    steps = 0
    for _ in DataLoader(dataset(0, index), **loader_args):
        steps += 1
        if steps == args.steps:
            break
    dist.barrier()
    seconds = time.perf_counter() - started
    dist.barrier()
    started = time.perf_counter()
    index_again = L.build_shard_index(shards) if indexed else None
    pairs = 2 * sum(1 for _ in (args.data / "shards").glob("*.tar")) * 1000
    next(iter(DataLoader(dataset(pairs // args.batch // 2, index_again), **loader_args)))
    resume_s = time.perf_counter() - started
    rows = [None] * world
    dist.all_gather_object(rows, {"read": read, "read_s": read_s, "seconds": seconds, "resume_s": resume_s,
                                      "index_s": index_s})
    if rank == 0:
        dataset_bytes = sum(Path(s).stat().st_size for s in shards)
        row = {"code": args.code, "world_size": world, "workers": args.workers, "dataset_bytes": dataset_bytes,
               "pairs": pairs, "bytes_read_per_process": int(np.mean([r["read"] for r in rows])),
               "pairs_per_s": round(args.steps * args.batch / max(r["seconds"] for r in rows), 1),
               "resume_first_batch_s": round(max(r["resume_s"] for r in rows), 3),
               "index_build_s": round(rows[0]["index_s"], 3), "global_batch": args.batch,
               "read_pass_s": round(max(r["read_s"] for r in rows), 3),
               "measured_steps": args.steps}
        print(json.dumps(row))
        Path(args.out).write_text(json.dumps(row))
    dist.destroy_process_group()


def loader(args) -> None:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    rows = []
    for world in args.world_sizes:
        for workers in args.workers:
            out = args.data / f"row-{args.code}-{world}-{workers}.json"
            command = [torchrun, "--standalone", "--nproc_per_node", str(world), __file__, "_rank",
                       "--code", args.code, "--code-root", str(args.code_root), "--data", str(args.data),
                       "--workers", str(workers), "--steps", str(args.steps), "--batch", str(args.batch),
                       "--buffer", str(args.buffer), "--out", str(out)]
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows.append(json.loads(out.read_text()))
    merge_rows("loader", rows, ("code", "world_size", "workers"))


def spread(args) -> None:
    """Distinct identities in a batch of 64 at CUHK-PEDES size (34,054 images of 11,003 people, ~2
    captions each, shards in annotation order): a shuffle buffer of 2,000 / 10,000 pairs over the
    stream (the loader before) against a permutation of all pairs (after)."""
    rng = np.random.default_rng(0)
    images_per_id = np.full(11003, 34054 // 11003)
    images_per_id[: 34054 - images_per_id.sum()] += 1
    ids = np.repeat(np.arange(11003), images_per_id * 2)  # pairs in annotation order
    batch, rows = 64, []

    def buffered(order, size):
        buffer, out = [], []
        for item in order:
            buffer.append(item)
            if len(buffer) >= size:
                out.append(buffer.pop(int(rng.integers(len(buffer)))))
        return out

    def mean_spread(stream):
        batches = np.asarray(stream[: len(stream) // batch * batch]).reshape(-1, batch)
        return float(np.mean([len(set(b)) for b in batches]))

    for size in (2000, 10000):
        rows.append({"shuffle": f"buffer {size}", "mean_identities_per_batch": round(mean_spread(buffered(ids, size)), 2)})
    rows.append({"shuffle": "permutation of all pairs", "mean_identities_per_batch": round(mean_spread(list(ids[rng.permutation(len(ids))])), 2)})
    for row in rows:
        row.update(batch=batch, pairs=len(ids), identities=11003)
        print(row)
    merge_rows("identity_spread", rows, ("shuffle",))


def decode(args) -> None:
    """Decode, augment and normalise one pair at the real profile's 384x128 (a smooth JPEG of a
    person-crop size, 128x48 upscaled, ~10 KB), one thread: the per-pair CPU cost of a loader worker."""
    sys.path.insert(0, str(REPO))
    import torch
    from PIL import Image

    from pipeline.data.augment import AugmentConfig, augmented_tensor
    from pipeline.models.preprocessing import ImagePreprocessor

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    payloads = []
    for _ in range(64):
        small = Image.fromarray(rng.integers(0, 255, (48, 16, 3), dtype=np.uint8)).resize((128, 384), Image.BILINEAR)
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=90)
        payloads.append(buffer.getvalue())
    preprocessor, config = ImagePreprocessor(384, 128), AugmentConfig(crop_padding=10)
    started = time.perf_counter()
    for i in range(args.pairs):
        augmented_tensor(preprocessor, Image.open(io.BytesIO(payloads[i % 64])), np.random.default_rng(i), config)
    ms = 1000 * (time.perf_counter() - started) / args.pairs
    row = {"size": "384x128", "jpeg_bytes": int(np.mean([len(p) for p in payloads])), "ms_per_pair_one_core": round(ms, 3)}
    print(row)
    merge_rows("decode", [row], ("size",))


# The two settings docs/scale.md projects to: pairs, images, bytes of shards, processes, workers each.
TARGETS = {
    "CUHK-PEDES, 1 node x 8 GPUs": {"pairs": 68_108, "images": 34_054, "bytes": 656e6, "ranks": 8, "workers": 8},
    "1.5 M pairs, 4 nodes x 8 GPUs": {"pairs": 1_500_000, "images": 1_500_000, "bytes": 150e9, "ranks": 32, "workers": 8},
}


STORAGE_BYTES_PER_S = 2e9  # an assumed node storage rate (local NVMe or a parallel file system): not measured here


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def _time(seconds: float) -> str:
    return f"{seconds / 60:,.1f} min" if seconds >= 120 else f"{seconds:,.1f} s"


def project(args) -> None:
    """The measured rows scaled to TARGETS, as a markdown table (docs/scale.md): bytes by the read
    pattern of each code (every worker reads everything, before; each pair once, after); CPU times by
    the rates measured per sample and per pair; storage time at STORAGE_BYTES_PER_S (assumed)."""
    results = json.loads(RESULTS.read_text())
    rows = {(r["code"], r["world_size"], r["workers"]): r for r in results["loader"]}
    before, after = rows["before", 1, 1], rows["after", 1, 1]
    bench_samples = after["pairs"] / 2
    scan_per_sample = before["read_pass_s"] / bench_samples  # one worker's tar scan, CPU, page cache
    index_per_sample = after["index_build_s"] / bench_samples
    decode_ms = results["decode"][0]["ms_per_pair_one_core"]
    table = {k: [] for k in ("read_before", "read_after", "disk_before", "disk_after", "scan", "resume_before",
                             "resume_after", "ceiling", "epoch")}
    for t in TARGETS.values():
        node = min(8, t["ranks"])
        captions = t["pairs"] / t["images"]
        node_before, node_after = node * t["workers"] * t["bytes"], captions * t["bytes"] * node / t["ranks"]
        table["read_before"].append(f"{_size(t['workers'] * t['bytes'])} a process, {_size(node_before)} a node")
        table["read_after"].append(f"{_size(captions * t['bytes'] / t['ranks'])} a process, {_size(node_after)} a node")
        table["disk_before"].append(_time(node_before / STORAGE_BYTES_PER_S))
        table["disk_after"].append(_time(node_after / STORAGE_BYTES_PER_S))
        table["scan"].append(_time(t["images"] * scan_per_sample))
        table["resume_before"].append(f"{_time(t['images'] / 2 * scan_per_sample)} of CPU, {_size(t['bytes'] / 2)} read, "
                                      "by every worker")
        table["resume_after"].append(f"{_time(t['images'] * index_per_sample)} (the main process's shard index), "
                                     "then one batch")
        ceiling = t["workers"] * 1000 / decode_ms
        table["ceiling"].append(f"{ceiling:,.0f} pairs/s a GPU ({t['workers']} workers x {1000 / decode_ms:,.0f})")
        table["epoch"].append(_time(t["pairs"] / (ceiling * t["ranks"])))
    names = {"read_before": "bytes read an epoch, before", "read_after": "bytes read an epoch, after",
             "disk_before": f"a node's reads an epoch at {STORAGE_BYTES_PER_S / 1e9:.0f} GB/s (assumed), before",
             "disk_after": "the same, after", "scan": "one worker's tar scan an epoch (CPU), before",
             "resume_before": "mid-epoch resume, before", "resume_after": "mid-epoch resume, after",
             "ceiling": "loader ceiling at 384x128, after", "epoch": "an epoch at the loader ceiling, after"}
    print("| figure | " + " | ".join(TARGETS) + " |\n|---|" + "---|" * len(TARGETS))
    for key, values in table.items():
        print(f"| {names[key]} | " + " | ".join(values) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("make", "loader", "spread", "decode", "project", "_rank"):
        sub = commands.add_parser(name)
        sub.add_argument("--data", type=Path, default=DATA)
        if name == "make":
            sub.add_argument("--images", type=int, default=100_000)
        if name == "decode":
            sub.add_argument("--pairs", type=int, default=500)
        if name in ("loader", "_rank"):
            sub.add_argument("--code", choices=("before", "after"), default="after")
            sub.add_argument("--code-root", type=Path, default=REPO)
            sub.add_argument("--steps", type=int, default=60, help="global batches timed with decoding")
            sub.add_argument("--batch", type=int, default=128)
            sub.add_argument("--buffer", type=int, default=10000, help="shuffle buffer of the loader before")
        if name == "loader":
            sub.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
            sub.add_argument("--workers", type=int, nargs="+", default=[1, 2])
        if name == "_rank":
            sub.add_argument("--workers", type=int, default=1)
            sub.add_argument("--out", required=True)
    args = parser.parse_args()
    {"make": make, "loader": loader, "spread": spread, "decode": decode, "project": project,
     "_rank": _rank}[args.command](args)


if __name__ == "__main__":
    main()
