#!/usr/bin/env bash
# The engine-core refactor on one GPU: GPU tests, then the benchmarks that touch the changed code
# (smallbatch, latency, a pipeline sub-grid), to compare with the last committed H200 runs.
# Usage: OUT=folder bash scripts/gpu_core_check.sh   (PART=tests|bench|pipeline|all)
set -uo pipefail
out=${OUT:-docs/benchmarks}
export PYTHONUNBUFFERED=1
part=${PART:-all}
if [ "$part" = tests ] || [ "$part" = all ]; then
  python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | grep -v "^\[transformers\]" \
    | tee "$out/gpu-tests.log" | tail -25
fi
if [ "$part" = bench ] || [ "$part" = all ]; then
  python3 -m splitserve bench smallbatch --shape qwen3-0.6b --out "$out" --name smallbatch 2>&1 | tail -6
  python3 -m splitserve bench latency --shape qwen3-8b --batch-sizes 1 16 64 256 --context-lens 256 1024 2048 \
    --max-num-seqs 256 --out "$out" --name latency-qwen3-8b 2>&1 | tail -16
fi
if [ "$part" = pipeline ] || [ "$part" = all ]; then
  python3 -m splitserve bench pipeline --shapes qwen3-8b --batch-sizes 256 1024 --context-lens 512 2048 \
    --splits 48 64 --m3-batch 0 --out "$out" --name pipeline 2>&1 | tail -20
fi
