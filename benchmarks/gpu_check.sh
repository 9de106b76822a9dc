#!/usr/bin/env bash
# One call on a lent GPU (under 5 minutes): environment, compiled-Triton correctness in bf16/fp16/fp32
# against float64 at the 224 and 512 shapes, then every benchmark. Results land in $OUT:
#   gpu_env.txt, gpu_correctness.txt, bench.txt, bench.json, RESULTS.md (the ratio table).
# Usage (device tool): bash benchmarks/gpu_check.sh   — commit $OUT/RESULTS.md as
# benchmarks/results/<date>-<gpu>.md together with gpu_env.txt's first lines.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
# compiled Triton, not the interpreter that tests/conftest.py enables by default on CPU machines
export TRITON_INTERPRET=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
  CLARITY_BENCH_SUMMARY="$OUT/RESULTS.md"
{
  date -u +"date: %Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
} 2>&1 | tee "$OUT/gpu_env.txt"
timeout 150 python3 -m pytest tests/test_gpu.py -q -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu_correctness.txt"
status=$?
# the NIH loader benchmark is CPU-side (and needs torchxrayvision, absent on the GPU image): skipped here
timeout 150 python3 -m pytest benchmarks -q -p no:cacheprovider -k "not loader" --benchmark-json "$OUT/bench.json" 2>&1 \
  | tee "$OUT/bench.txt" | grep -E '^\||passed|failed|error' 
cat "$OUT/gpu_env.txt" "$OUT/RESULTS.md" 2>/dev/null
exit $status
