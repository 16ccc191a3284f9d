#!/usr/bin/env bash
# The real profile on one GPU, in under 10 minutes: the real-shape end-to-end run of
# tests/test_real_profile.py (every stage through DVC, now on the GPU), then the throughput of the
# real models at real sizes (benchmarks/bench_real_shapes.py: CLIP training pairs/s at batch 128 in
# bf16, SD 1.5 UNet evaluations/s and p2p edits/s at the 512x192 canvas in float16, peak memory).
#
#   PYTHON=/path/to/python benchmarks/gpu_check.sh [OUT_DIR]     # default OUT_DIR: benchmarks/results
#
# Needs an environment with the project installed (`pip install -e ".[test]"`, open-clip-torch
# --no-deps) and a CUDA build of torch 2.13; the shared fixtures beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to this torch"
print("gpu:", torch.cuda.get_device_name(), "bf16:", torch.cuda.is_bf16_supported(), "torch:", torch.__version__)
PY
started=$(date +%s)
TBPS_REAL_SHAPES_REPORT="$OUT/gpu_real_shapes.json" "$PYTHON" -m pytest -x -q -p no:cacheprovider tests/test_real_profile.py
echo "real-shape run: $(( $(date +%s) - started )) s"
"$PYTHON" benchmarks/bench_real_shapes.py --batch 128 --steps 50 --sources 4 --out "$OUT/gpu_check.json"
echo "total: $(( $(date +%s) - started )) s; results in $OUT/gpu_real_shapes.json and $OUT/gpu_check.json"
