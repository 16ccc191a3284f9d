"""Search at scale: exact search and the approximate indexes against the bare matrix product.

Galleries of 10^3, 10^5 and 10^6 unit embeddings at 512 dimensions (the real profile's CLIP
dimension). The vectors are structured like learned embeddings: a random 32-dimensional latent
mapped into 512 dimensions plus isotropic noise, normalised (a query's best match has cosine ~0.7,
a random pair ~0). Uniform random unit vectors in 512-d have no neighbourhood structure at all
(every point is nearly equally far from every other), so they are also measured once, at 10^5, to
show what an approximate index does there. Per gallery size:
  bare                the float32 product queries @ gallery.T alone (the physical limit)
  exact               pipeline.search.index.exact_top_k (product + torch.topk selection, bounded blocks)
  exact_argpartition  the selection exact search had before: NumPy argpartition (one thread)
  faiss_flat          FAISS's exact search (faiss.knn, inner product): the other library top-k
  hnsw                FAISS IndexHNSWFlat, M 32, efSearch 256 (what `search.index: hnsw` builds)
  ivfpq               FAISS IVF-PQ, 1024 lists, 64 sub-quantisers of 8 bits, nprobe 32 (the alternative)
Single-query latency p50/p99 (200 queries one at a time), batched time (1,000 queries in blocks of
100, the fastest of 3 passes) and its ratio to the bare product's (`batched_ratio_to_gemm`), recall@10
against exact, build seconds and index bytes. `--exact-only` measures bare and exact alone (the 10^6
run without the HNSW build). The index build's peak memory: `build_index` of a synthetic gallery of
`--build-images` JPEG crops in tar shards (a tiny random model) in a subprocess: its
resource.getrusage ru_maxrss, and its children's (the loader workers). End to end: one text query on
the embedded gallery (tokenise + encode + search + table, models/pdg/best) and index build images/s.
Writes benchmarks/results/search.json (search_exact.json with --exact-only), and merges rows {gallery, method, batched_ratio_to_gemm, p50_ms,
recall_at_10} into benchmarks/results/scale.json's `search` list (other keys are other benchmarks').

    python benchmarks/bench_search.py [--sizes 1000 100000 1000000] [--exact-only] [--threads N]
                                      [--build-images N] [--code-root DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from scale_results import merge_rows  # benchmarks/ is on sys.path when a benchmark runs as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "search.json"
EXACT_RESULTS = REPO / "benchmarks" / "results" / "search_exact.json"  # an --exact-only run's
SCALE = REPO / "benchmarks" / "results" / "scale.json"
SCRATCH = REPO / "build" / "bench_search"
DIM, LATENT, K = 512, 32, 10
SINGLE, BATCH, BLOCK, PASSES = 200, 1000, 100, 3
EF_SEARCH = (64, 128, 256, 512)
LABELS = {"bare": "bare product", "exact": "exact (torch.topk)", "exact_argpartition": "exact (argpartition, before)",
          "faiss_flat": "exact (faiss flat)", "hnsw": "hnsw, efSearch 256", "ivfpq": "ivf-pq, nprobe 32"}


def structured(n: int, rng: np.random.Generator, basis: np.ndarray) -> np.ndarray:
    x = rng.standard_normal((n, LATENT), dtype=np.float32) @ basis
    x += 0.3 * rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def uniform(n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed(fn, queries: np.ndarray) -> tuple[dict, np.ndarray | None]:
    """Single-query latency (ms, p50/p99) and batched time (s, the fastest of PASSES) and throughput;
    the batched results."""
    fn(queries[:BLOCK])  # warm-up
    latencies = []
    for q in queries[:SINGLE]:
        started = time.perf_counter()
        fn(q[None])
        latencies.append(1000 * (time.perf_counter() - started))
    best = float("inf")
    for _ in range(PASSES):
        started = time.perf_counter()
        rows = [fn(queries[i : i + BLOCK]) for i in range(0, len(queries), BLOCK)]
        best = min(best, time.perf_counter() - started)
    return {"p50_ms": round(float(np.percentile(latencies, 50)), 3), "p99_ms": round(float(np.percentile(latencies, 99)), 3),
            "batched_s": round(best, 4), "queries_per_s": round(len(queries) / best, 1)}, \
        (np.concatenate(rows) if rows[0] is not None else None)


def argpartition_top_k(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The selection exact search had before torch.topk: argpartition, a lexsort of the k, and a pass
    over the scores for ties at the cut (rows only; the rare full re-sort of a tied row left out)."""
    scores = queries @ gallery.T
    n = scores.shape[1]
    part = np.argpartition(scores, n - k, axis=1)[:, n - k :]
    part_scores = np.take_along_axis(scores, part, 1)
    order = np.lexsort((part, -part_scores), axis=-1)
    rows, top = np.take_along_axis(part, order, 1), np.take_along_axis(part_scores, order, 1)
    (scores == top[:, -1:]).sum(1)
    return rows


def measure(gallery: np.ndarray, queries: np.ndarray, approximate: bool, exact_only: bool = False) -> dict:
    import faiss

    from pipeline.search.index import HNSW_EF_SEARCH, build_hnsw, exact_top_k, hnsw_top_k, recall_at

    n = len(gallery)
    out = {"gallery": n, "dim": DIM, "embeddings_bytes": gallery.nbytes}
    out["bare"], _ = timed(lambda q: (q @ gallery.T, None)[1], queries)
    out["exact"], truth = timed(lambda q: exact_top_k(gallery, q, K)[1], queries)
    out["exact"].update(vs_bare_p50=round(out["exact"]["p50_ms"] / out["bare"]["p50_ms"], 2), recall_at_10=1.0)
    if not exact_only:
        out["exact_argpartition"], found = timed(lambda q: argpartition_top_k(gallery, q, K), queries)
        out["exact_argpartition"]["recall_at_10"] = round(recall_at(found, truth), 4)
        out["faiss_flat"], found = timed(lambda q: faiss.knn(q, gallery, K, faiss.METRIC_INNER_PRODUCT)[1], queries)
        out["faiss_flat"]["recall_at_10"] = round(recall_at(found, truth), 4)
    for method in ("exact", "exact_argpartition", "faiss_flat"):
        if method in out:
            out[method]["batched_ratio_to_gemm"] = round(out[method]["batched_s"] / out["bare"]["batched_s"], 2)
    print(f"  exact: {out['exact']} (bare {out['bare']})", flush=True)
    if not approximate:
        return out
    started = time.perf_counter()
    hnsw = build_hnsw(gallery)
    build = time.perf_counter() - started
    links = hnsw.hnsw.neighbors.size() * 4 + hnsw.hnsw.offsets.size() * 8 + hnsw.hnsw.levels.size() * 4
    sweep = []
    for ef in EF_SEARCH:  # search breadth: the recall / speed trade-off, on one graph
        hnsw.hnsw.efSearch = ef
        timing, found = timed(lambda q: hnsw.search(q, K)[1], queries)
        sweep.append({"ef_search": ef, **timing, "recall_at_10": round(recall_at(found, truth), 4),
                      "speedup_vs_exact": round(out["exact"]["p50_ms"] / timing["p50_ms"], 1)})
    out["hnsw"], found = timed(lambda q: hnsw_top_k(hnsw, q, K)[1], queries)  # as the product searches
    out["hnsw"].update(build_s=round(build, 1), bytes=int(gallery.nbytes + links), ef_search=HNSW_EF_SEARCH,
                       recall_at_10=round(recall_at(found, truth), 4),
                       speedup_vs_exact=round(out["exact"]["p50_ms"] / out["hnsw"]["p50_ms"], 1), sweep=sweep,
                       batched_ratio_to_gemm=round(out["hnsw"]["batched_s"] / out["bare"]["batched_s"], 2))
    print(f"  hnsw built in {build:.1f} s: {out['hnsw']}", flush=True)
    del hnsw
    started = time.perf_counter()
    quantiser = faiss.IndexFlatIP(DIM)
    ivf = faiss.IndexIVFPQ(quantiser, DIM, 1024, 64, 8, faiss.METRIC_INNER_PRODUCT)
    ivf.train(gallery[np.random.default_rng(1).choice(n, min(n, 100_000), replace=False)])
    ivf.add(gallery)
    ivf.nprobe = 32
    build = time.perf_counter() - started
    out["ivfpq"], found = timed(lambda q: ivf.search(q, K)[1], queries)
    out["ivfpq"].update(build_s=round(build, 1), bytes=int(n * 64 + 1024 * DIM * 4 + 64 * 256 * 8 * 4), nprobe=32,
                        recall_at_10=round(recall_at(found, truth), 4),
                        speedup_vs_exact=round(out["exact"]["p50_ms"] / out["ivfpq"]["p50_ms"], 1),
                        batched_ratio_to_gemm=round(out["ivfpq"]["batched_s"] / out["bare"]["batched_s"], 2))
    return out


def end_to_end(variant: str = "pdg") -> dict | None:
    """One text query through the CLI's path on the embedded test gallery, and the index build rate."""
    import torch

    from pipeline.core.config import load_params
    from pipeline.search.build import IndexPaths, build_index
    from pipeline.models import NoTrainedModel, trained_model
    from pipeline.search.query import Searcher, format_table

    os.chdir(REPO)
    params = load_params()
    # the stage's own build, into a scratch root that links the real models and data (a data/ folder
    # already there is used as it is)
    scratch = REPO / "build" / "bench_search"
    scratch.mkdir(parents=True, exist_ok=True)
    for name in ("models", "data"):
        if not (scratch / name).exists():
            (scratch / name).symlink_to(REPO / name)
    try:
        trained_model(scratch / "models" / variant)
    except NoTrainedModel as missing:
        print(f"end to end: {missing}; skipped", flush=True)
        return None
    if not list((scratch / "data" / "prepared" / "shards").glob("test-*.tar")):
        print("end to end: no data/prepared test shards (run `dvc repro prepare`); skipped", flush=True)
        return None
    built = build_index(params, variant, torch.device("cpu"), IndexPaths.under(scratch, variant))
    searcher = Searcher.for_variant(params, variant, scratch)
    queries = ["a woman in a red coat with a black backpack", "a man wearing a blue shirt and grey trousers",
               "a person in a green jacket carrying a bag", "a girl with long blond hair in a white dress"]
    latencies = []
    for i in range(50):
        started = time.perf_counter()
        format_table(searcher.search([queries[i % len(queries)]], 10)[0], searcher.index)
        latencies.append(1000 * (time.perf_counter() - started))
    return {"variant": variant, "gallery": built["gallery_size"], "index_kind": built["index_kind"],
            "query_p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "query_p99_ms": round(float(np.percentile(latencies, 99)), 2),
            "index_build_images_per_s": built["embed_images_per_second"], "index_build_s": built["build_seconds"]}


_BUILD_CHILD = """
import json, resource, sys, time
from pathlib import Path
import torch
from pipeline.core.config import params_from_dict
from pipeline.search.build import IndexPaths, build_index
root = Path(sys.argv[1])
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
params = params_from_dict({"search": {"gallery": "test", "index": "exact"}, "train": {"eval_batch_size": 256}})
metrics = build_index(params, "synthetic", torch.device("cpu"), IndexPaths(root / "models" / "synthetic", root / "data" / "prepared", root / "index" / "synthetic", root / "metrics.json", root / "timing.json"))
print(json.dumps({"rss_after_imports_mib": round(start / 1024, 1),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "children_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
                  "images_per_s": metrics["embed_images_per_second"], "gallery": metrics["gallery_size"]}))
"""


def synthetic_build_gallery(images: int) -> Path:
    """SCRATCH/memory-N: data/prepared/shards/test-*.tar of `images` random 128x64 JPEG crops (1,000 a
    shard, each with its json) and models/synthetic/best, a tiny random dual encoder. Made once."""
    import io
    import tarfile

    from PIL import Image

    root = SCRATCH / f"memory-{images}"
    if (root / "done").is_file():
        return root
    from pipeline.core.config import ModelConfig
    from pipeline.models import build_model

    shards = root / "data" / "prepared" / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for shard in range(0, images, 1000):
        with tarfile.open(shards / f"test-{shard // 1000:06d}.tar", "w") as tar:
            for i in range(shard, min(images, shard + 1000)):
                pixels = (rng.random((128, 64, 3)) * 255).astype(np.uint8)
                payload = io.BytesIO()
                Image.fromarray(pixels).save(payload, format="JPEG", quality=90)
                for name, data in ((f"{i:07d}.jpg", payload.getvalue()), (f"{i:07d}.json", json.dumps({"person_id": i}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    config = ModelConfig(width=32, layers=1, heads=2, patch_size=8, vocab_size=200, embed_dim=32, max_text_length=32)
    build_model(config, (64, 32), captions=["a man in a red coat", "a woman with a black bag"] * 50) \
        .save_pretrained(root / "models" / "synthetic" / "best")
    (root / "done").write_text("")
    return root


def build_memory(images: int, code_root: Path) -> dict:
    """Peak memory (ru_maxrss) of `build_index` over `images` synthetic crops, in a fresh subprocess that
    imports the pipeline of `code_root` (this checkout, or an older commit's files to compare with)."""
    root = synthetic_build_gallery(images)
    image_bytes = sum(path.stat().st_size for path in (root / "data" / "prepared" / "shards").glob("*.tar"))
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    done = subprocess.run([sys.executable, "-c", _BUILD_CHILD, str(root)], cwd=code_root, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_search: the build of {root} failed:\n{done.stderr[-2000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return {"images": images, "shard_bytes_mib": round(image_bytes / 2**20, 1), "code_root": str(code_root),
            "measured_by": "resource.getrusage ru_maxrss of a subprocess running build_index", **measured}


def scale_rows(sizes: list[dict]) -> list[dict]:
    """One row per (gallery, method) for benchmarks/results/scale.json's `search` list."""
    rows = []
    for size in sizes:
        suffix = "" if size["data"] == "structured" else f" ({size['data']} vectors)"
        for method, label in LABELS.items():
            if method in size:
                row = size[method]
                rows.append({"gallery": size["gallery"], "method": label + suffix,
                             "batched_ratio_to_gemm": row.get("batched_ratio_to_gemm", 1.0 if method == "bare" else None),
                             "p50_ms": row["p50_ms"], "recall_at_10": row.get("recall_at_10")})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 100_000, 1_000_000])
    parser.add_argument("--exact-only", action="store_true",
                        help="measure the bare product and exact search alone (no HNSW / IVF-PQ build, no end to end)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--build-images", type=int, default=10_000,
                        help="synthetic crops whose index build's peak memory is measured (0: not measured)")
    parser.add_argument("--code-root", type=Path, default=REPO,
                        help="the checkout whose pipeline the build-memory subprocess imports (default this one)")
    parser.add_argument("--out", type=Path, help=f"the JSON written (default {RESULTS.relative_to(REPO)}, "
                                                 f"{EXACT_RESULTS.relative_to(REPO)} with --exact-only)")
    parser.add_argument("--scale", type=Path, default=SCALE,
                        help=f"the file whose `search` rows are merged (default {SCALE.relative_to(REPO)})")
    args = parser.parse_args()
    args.out = args.out or (EXACT_RESULTS if args.exact_only else RESULTS)
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    from pipeline.core.runtime import machine

    began = time.perf_counter()
    rng = np.random.default_rng(0)
    # float32 throughout: a NumPy float64 scalar would promote every array it touches
    basis = (rng.standard_normal((LATENT, DIM), dtype=np.float32) / np.float32(np.sqrt(LATENT))).astype(np.float32)
    result = {"date": datetime.date.today().isoformat(), "machine": machine(), "threads": args.threads,
              "faiss": faiss.__version__, "numpy": np.__version__, "torch": torch.__version__, "k": K,
              "single_queries": SINGLE, "batched_queries": BATCH, "block": BLOCK, "batched_passes": PASSES,
              "exact_only": args.exact_only, "sizes": [],
              # the machine is shared: other work running beside the benchmark slows it
              "load_average_at_start": round(os.getloadavg()[0], 2)}
    for n in args.sizes:
        started = time.perf_counter()
        gallery, queries = structured(n, rng, basis), structured(BATCH, rng, basis)
        assert gallery.dtype == queries.dtype == np.float32
        row = measure(gallery, queries, approximate=n >= 100_000 and not args.exact_only, exact_only=args.exact_only)
        row["data"] = "structured"
        result["sizes"].append(row)
        print(f"{n}: {json.dumps(row)} ({time.perf_counter() - started:.0f} s)", flush=True)
        del gallery
    if 100_000 in args.sizes and not args.exact_only:
        row = measure(uniform(100_000, rng), uniform(BATCH, rng), approximate=True)
        row["data"] = "uniform"
        result["sizes"].append(row)
        print(f"uniform 100000: {json.dumps(row)}", flush=True)
    if args.build_images:
        result["build_memory"] = build_memory(args.build_images, args.code_root.resolve())
        print(f"index build memory: {json.dumps(result['build_memory'])}", flush=True)
    result["end_to_end"] = None if args.exact_only else end_to_end()
    result["total_seconds"] = round(time.perf_counter() - began)
    result["load_average_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result["end_to_end"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if result["sizes"]:
        merge_rows("search", scale_rows(result["sizes"]), ("gallery", "method"), args.scale)
        print(f"merged {len(scale_rows(result['sizes']))} rows into {args.scale} (search)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
