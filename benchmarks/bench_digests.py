"""What content digests cost at scale: the `externals` stage over a CUHK-PEDES-like root and
`files_digest` over shard-like files, each on a cold cache (first run) and a warm one (the next run).

A synthetic root holds --files tiny images in CUHK-PEDES's folders (imgs/CUHK01, CUHK03, Market,
test_query, train_query) and a reid_raw.json naming every one of them. Each measurement runs in a
fresh Python process, in a throw-away DVC-like project (a .dvc/tmp folder: where the digest state
persists), with the code of one checkout on PYTHONPATH: this one ("after"), and --code-root, a
worktree of an earlier commit ("before": `git worktree add --detach /tmp/before <commit>`). The
seconds are those of the call alone (imports excluded). The files were just written, so they are
in the page cache: cold means no digest state, not a cold disk. Appends its rows to the `digests`
list of benchmarks/results/scale.json (other benchmarks write other keys of that file).

    python benchmarks/bench_digests.py [--files 200000] [--code-root /tmp/before] [--shard-mb 1024]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scale_results import merge_rows  # benchmarks/ is on sys.path when a benchmark runs as a script

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "scale.json"
FOLDERS = ("CUHK01", "CUHK03", "Market", "test_query", "train_query")
SHARD_MB = 64
MEASURED = ("pipeline/core/io.py", "pipeline/externals.py", "pipeline/data/sources.py")  # the code a row's commit names

# Run in a child process with a checkout's code on PYTHONPATH; prints {"seconds": ...}.
CHILD = """
import json, sys, time
from pathlib import Path
what, target = sys.argv[1], sys.argv[2]
if what == "externals":
    from pipeline.core.config import params_from_dict
    from pipeline.externals import write_stage_digests
    params = params_from_dict({"data": {"source": "cuhk-pedes", "root": target}})
    started = time.perf_counter()
    digests = write_stage_digests(params, Path("data/externals"))
    seconds, entry = time.perf_counter() - started, digests["prepare"]["data.root"]
    print(json.dumps({"seconds": seconds, "files": entry.get("files"), "problems": entry.get("problems")}))
else:
    from pipeline.core.io import files_digest
    paths = sorted(str(p) for p in Path(target).iterdir())
    started = time.perf_counter()
    rows = files_digest(paths)
    print(json.dumps({"seconds": time.perf_counter() - started, "files": len(rows)}))
"""


def make_root(root: Path, count: int) -> None:
    """CUHK-PEDES's layout: count distinct tiny image files and an annotation file naming each."""
    records = []
    for folder in FOLDERS:
        (root / "imgs" / folder).mkdir(parents=True)
    for i in range(count):
        name = f"{FOLDERS[i % len(FOLDERS)]}/{i:07d}.png"
        (root / "imgs" / name).write_bytes(b"\x89PNG" + i.to_bytes(8, "little") * 32)
        split = "train" if i % 10 < 8 else ("val" if i % 10 == 8 else "test")
        records.append({"split": split, "id": i // 4, "file_path": name,
                        "captions": [f"a person {i} in a red jacket and blue jeans", "walking with a bag"]})
    (root / "reid_raw.json").write_text(json.dumps(records))


def make_shards(folder: Path, total_mb: int) -> int:
    folder.mkdir(parents=True)
    block = os.urandom(SHARD_MB << 20)
    count = max(1, total_mb // SHARD_MB)
    for i in range(count):
        (folder / f"shard-{i:06d}.tar").write_bytes(i.to_bytes(8, "little") + block[8:])
    return count


def run_child(code_root: Path, project: Path, what: str, target: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    done = subprocess.run([sys.executable, "-c", CHILD, what, str(target)], cwd=project, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_digests: {what} with the code of {code_root} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def state_bytes(project: Path) -> int:
    tmp = project / ".dvc" / "tmp"
    return sum(path.stat().st_size for path in tmp.rglob("*.json") if path.is_file())


def commit_of(code_root: Path) -> str:
    done = subprocess.run(["git", "-C", str(code_root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(code_root), "status", "--porcelain", "--", *MEASURED],
                           capture_output=True, text=True).stdout.strip()
    return (done.stdout.strip() or "unknown") + ("+uncommitted" if dirty else "")


def measure(label: str, code_root: Path, work: Path, root: Path, shards: Path, files: int, shard_bytes: int) -> list[dict]:
    project = work / f"project-{label}"
    (project / ".dvc" / "tmp").mkdir(parents=True)
    common = {"code": label, "commit": commit_of(code_root)}
    cold = run_child(code_root, project, "externals", root)
    warm = run_child(code_root, project, "externals", root)
    if cold["problems"] or cold["files"] != files + 1:
        sys.exit(f"bench_digests: {label}: the root was not digested whole: {cold}")
    size = state_bytes(project)
    externals = {"measure": "write_stage_digests", **common, "files": files, "cold_s": round(cold["seconds"], 3),
                 "warm_s": round(warm["seconds"], 3), "state_bytes": size,
                 "state_bytes_per_1000_files": round(size * 1000 / (files + 1))}
    first = run_child(code_root, project, "files", shards)
    second = run_child(code_root, project, "files", shards)
    shard_row = {"measure": "files_digest", **common, "files": first["files"], "bytes": shard_bytes,
                 "cold_s": round(first["seconds"], 3), "warm_s": round(second["seconds"], 3)}
    for row in (externals, shard_row):
        print(json.dumps(row))
    return [externals, shard_row]


def machine() -> dict:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
            break
    return {"cpu": model or "unknown", "cores": os.cpu_count()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200_000, help="images under the synthetic root")
    parser.add_argument("--code-root", type=Path, help="a worktree of the code to compare with (\"before\")")
    parser.add_argument("--shard-mb", type=int, default=1024, help="megabytes of shard-like files for files_digest")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results file (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, help="where the synthetic files go (default: a temporary folder)")
    args = parser.parse_args()
    if args.files < 1 or args.shard_mb < 1:
        parser.error("--files and --shard-mb must be at least 1")
    if args.code_root and not (args.code_root / "pipeline" / "externals.py").is_file():
        parser.error(f"--code-root {args.code_root}: no pipeline/externals.py there (not a checkout of this project)")
    work = Path(tempfile.mkdtemp(prefix="bench-digests-", dir=args.workdir))
    try:
        started = time.perf_counter()
        make_root(work / "cuhk-pedes", args.files)
        shard_count = make_shards(work / "shards", args.shard_mb)
        time.sleep(2.1)  # older than the cache's racy window (pipeline/core/io.py RACY_NS), as a real data set is
        print(f"made {args.files} images and {shard_count} shards in {time.perf_counter() - started:.1f} s")
        shard_bytes = sum(path.stat().st_size for path in (work / "shards").iterdir())
        rows = []
        for label, code_root in (("before", args.code_root), ("after", REPO)):
            if code_root is not None:
                rows += measure(label, code_root.resolve(), work, work / "cuhk-pedes", work / "shards", args.files,
                                shard_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stamp = {"date": datetime.date.today().isoformat(), **machine()}
    merge_rows("digests", [{**row, **stamp} for row in rows], ("measure", "code", "files"), args.out)
    print(f"wrote {len(rows)} rows to {args.out} (digests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
