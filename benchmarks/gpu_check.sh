#!/usr/bin/env bash
# One call on a lent GPU (under 6 minutes on one H100, compilation and autotuning included):
#   1. environment            -> gpu_env.txt (GPU, driver, torch, triton, timm)
#   2. compiled-Triton checks -> gpu_correctness.txt (tests/test_gpu.py: both backends in bf16/fp16/fp32
#                                against float64 at the 224 and 512 shapes, determinism, model, compile, auto)
#   3. every benchmark        -> bench.txt, bench.json, RESULTS.md (the ratio table, written row by row,
#                                so a stage stopped by its timeout keeps the rows it measured)
# Each stage has its own timeout; the exit status is non-zero if any stage failed or timed out.
# Usage (device tool): bash benchmarks/gpu_check.sh   — commit $OUT/RESULTS.md as
# benchmarks/results/<date>-<gpu>.md together with gpu_env.txt.
# On a CPU machine the same command is a dry run: the GPU tests skip and the benchmarks run their CPU rows
# (CLARITY_GPU_CHECK_SELECT=test_attention keeps it to the attention rows, as tests/test_gpu_check_dry_run.py does).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
# compiled Triton, not the interpreter that tests/conftest.py enables by default on CPU machines
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 \
  CLARITY_BENCH_SUMMARY="$OUT/RESULTS.md"
CORRECTNESS_TIMEOUT="${CORRECTNESS_TIMEOUT:-210}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-240}"
BENCH_SELECT="${CLARITY_GPU_CHECK_SELECT:-not loader}"
status=0

{
  date -u +"date: %Y-%m-%d %H:%M UTC"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
  else
    echo "gpu: none (nvidia-smi not found)"
  fi
  timeout 60 python3 -c "import torch, triton, timm; print('torch', torch.__version__, '| triton', triton.__version__, '| timm', timm.__version__, '| cuda', torch.version.cuda)"
  # clarity_fast.kernels is the checkout's kernels/ folder, found through an (editable) install:
  # install this checkout without dependencies or network unless it already is the one imported
  if ! python3 -c "import os, clarity_fast.kernels as k; assert os.path.realpath(k.__file__).startswith(os.path.realpath('kernels'))" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . && echo "installed: this checkout (editable)"
  fi
} 2>&1 | tee "$OUT/gpu_env.txt"

stage() {  # stage NAME TIMEOUT LOG CMD...: run CMD under its own timeout, tee its output, remember failures
  local name=$1 limit=$2 log=$3
  shift 3
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  echo "stage $name: exit $rc in $((SECONDS - start)) s (timeout ${limit} s)" | tee -a "$OUT/gpu_env.txt"
  [ "$rc" -eq 0 ] || status=$rc
}

stage correctness "$CORRECTNESS_TIMEOUT" "$OUT/gpu_correctness.txt" \
  python3 -m pytest tests/test_gpu.py -q -s -p no:cacheprovider
# the NIH loader benchmark is CPU-side (and needs torchxrayvision, absent on the GPU image): skipped here
stage benchmarks "$BENCH_TIMEOUT" "$OUT/bench.txt" \
  python3 -m pytest benchmarks -q -p no:cacheprovider -k "$BENCH_SELECT" --benchmark-json "$OUT/bench.json"
grep -E 'passed|failed|error' "$OUT/bench.txt" | tail -n 3
cat "$OUT/gpu_env.txt" "$OUT/RESULTS.md" 2>/dev/null
exit $status
