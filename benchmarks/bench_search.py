"""Search at scale: exact search and the approximate indexes against the bare matrix product.

Galleries of 10^3, 10^5 and 10^6 unit embeddings at 512 dimensions (the real profile's CLIP
dimension). The vectors are structured like learned embeddings: a random 32-dimensional latent
mapped into 512 dimensions plus isotropic noise, normalised (a query's best match has cosine ~0.7,
a random pair ~0). Uniform random unit vectors in 512-d have no neighbourhood structure at all
(every point is nearly equally far from every other), so they are also measured once, at 10^5, to
show what an approximate index does there. Per gallery size:
  bare      the float32 product queries @ gallery.T alone (the physical limit)
  exact     pipeline.search.index.exact_top_k (product + top-k selection)
  hnsw      FAISS IndexHNSWFlat, M 32, efSearch 128 (what `search.index: hnsw` builds)
  ivfpq     FAISS IVF-PQ, 1024 lists, 64 sub-quantisers of 8 bits, nprobe 32 (the alternative)
Single-query latency p50/p99 (200 queries one at a time), batched throughput (1,000 queries in
blocks of 100), recall@10 against exact, build seconds and index bytes. End to end: one text query on
the embedded gallery (tokenise + encode + search + table, models/pdg/best) and index build images/s.
Writes benchmarks/results/search.json.

    python benchmarks/bench_search.py [--sizes 1000 100000 1000000] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "search.json"
DIM, LATENT, K = 512, 32, 10
SINGLE, BATCH, BLOCK = 200, 1000, 100
EF_SEARCH = (64, 128, 256, 512)


def structured(n: int, rng: np.random.Generator, basis: np.ndarray) -> np.ndarray:
    x = rng.standard_normal((n, LATENT), dtype=np.float32) @ basis
    x += 0.3 * rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def uniform(n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed(fn, queries: np.ndarray) -> dict:
    """Single-query latency (ms, p50/p99) and batched throughput (queries/s); the batched results."""
    fn(queries[:1])  # warm-up
    latencies = []
    for q in queries[:SINGLE]:
        started = time.perf_counter()
        fn(q[None])
        latencies.append(1000 * (time.perf_counter() - started))
    started = time.perf_counter()
    rows = [fn(queries[i : i + BLOCK]) for i in range(0, len(queries), BLOCK)]
    seconds = time.perf_counter() - started
    return {"p50_ms": round(float(np.percentile(latencies, 50)), 3), "p99_ms": round(float(np.percentile(latencies, 99)), 3),
            "queries_per_s": round(len(queries) / seconds, 1)}, (np.concatenate(rows) if rows[0] is not None else None)


def measure(gallery: np.ndarray, queries: np.ndarray, approximate: bool) -> dict:
    import faiss

    from pipeline.search.index import HNSW_EF_SEARCH, build_hnsw, exact_top_k, hnsw_top_k, recall_at

    n = len(gallery)
    out = {"gallery": n, "dim": DIM, "embeddings_bytes": gallery.nbytes}
    out["bare"], _ = timed(lambda q: (q @ gallery.T, None)[1], queries)
    out["exact"], truth = timed(lambda q: exact_top_k(gallery, q, K)[1], queries)
    out["exact"]["vs_bare_p50"] = round(out["exact"]["p50_ms"] / out["bare"]["p50_ms"], 2)
    out["exact"]["vs_bare_throughput"] = round(out["bare"]["queries_per_s"] / out["exact"]["queries_per_s"], 2)
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
                       speedup_vs_exact=round(out["exact"]["p50_ms"] / out["hnsw"]["p50_ms"], 1), sweep=sweep)
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
                        speedup_vs_exact=round(out["exact"]["p50_ms"] / out["ivfpq"]["p50_ms"], 1))
    return out


def end_to_end(variant: str = "pdg") -> dict | None:
    """One text query through the CLI's path on the embedded test gallery, and the index build rate."""
    import torch

    from pipeline.config import load_params
    from pipeline.search.build import IndexPaths, build_index
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
    if not (scratch / "models" / variant / "best" / "model.safetensors").is_file() or \
            not list((scratch / "data" / "prepared" / "shards").glob("test-*.tar")):
        print(f"end to end: no models/{variant}/best or data/prepared test shards, skipped", flush=True)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 100_000, 1_000_000])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"the JSON written (default {RESULTS.relative_to(REPO)})")
    args = parser.parse_args()
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    from pipeline.runtime import machine

    began = time.perf_counter()
    rng = np.random.default_rng(0)
    # float32 throughout: a NumPy float64 scalar would promote every array it touches
    basis = (rng.standard_normal((LATENT, DIM), dtype=np.float32) / np.float32(np.sqrt(LATENT))).astype(np.float32)
    result = {"date": datetime.date.today().isoformat(), "machine": machine(), "threads": args.threads,
              "faiss": faiss.__version__, "numpy": np.__version__, "k": K, "single_queries": SINGLE,
              "batched_queries": BATCH, "block": BLOCK, "sizes": [],
              # the machine is shared: other work running beside the benchmark slows it
              "load_average_at_start": round(os.getloadavg()[0], 2)}
    for n in args.sizes:
        started = time.perf_counter()
        gallery, queries = structured(n, rng, basis), structured(BATCH, rng, basis)
        assert gallery.dtype == queries.dtype == np.float32
        row = measure(gallery, queries, approximate=n >= 100_000)
        row["data"] = "structured"
        result["sizes"].append(row)
        print(f"{n}: {json.dumps(row)} ({time.perf_counter() - started:.0f} s)", flush=True)
        del gallery
    if 100_000 in args.sizes:
        row = measure(uniform(100_000, rng), uniform(BATCH, rng), approximate=True)
        row["data"] = "uniform"
        result["sizes"].append(row)
        print(f"uniform 100000: {json.dumps(row)}", flush=True)
    result["end_to_end"] = end_to_end()
    result["total_seconds"] = round(time.perf_counter() - began)
    result["load_average_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result["end_to_end"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
