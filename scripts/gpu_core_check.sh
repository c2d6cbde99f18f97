#!/usr/bin/env bash
# The engine-core refactor on the GPU: GPU tests, the benchmarks that touch the changed code
# (smallbatch, latency, a pipeline sub-grid), and the two-GPU PD test (needs 2 GPUs).
# Usage: OUT=folder PART=tests|bench|pipeline|pd bash scripts/gpu_core_check.sh
set -uo pipefail
out=${OUT:-docs/benchmarks}
export PYTHONUNBUFFERED=1
case ${PART:-tests} in
tests)
  timeout 280 python3 -m pytest -q -m gpu tests/test_gpu.py -k "not pd_two_gpus" -p no:cacheprovider 2>&1 \
    | grep --line-buffered -v "^\[transformers\]" | tee "$out/gpu-tests.log" | tail -25 ;;
bench)
  timeout 100 python3 -m splitserve bench smallbatch --shape qwen3-0.6b --out "$out" --name smallbatch 2>&1 | tail -6
  timeout 180 python3 -m splitserve bench latency --shape qwen3-8b --batch-sizes 1 16 64 256 \
    --context-lens 256 1024 2048 --max-num-seqs 256 --out "$out" --name latency-qwen3-8b 2>&1 | tail -16 ;;
pipeline)
  python3 -m splitserve bench pipeline --shapes qwen3-8b --batch-sizes 256 1024 --context-lens 512 2048 \
    --splits 48 64 --m3-batch 0 --out "$out" --name pipeline 2>&1 | tail -20 ;;
pd)
  NCCL_DEBUG=WARN timeout 120 python3 -m pytest -q -s -m gpu tests/test_gpu.py -k pd_two_gpus -p no:cacheprovider \
    2>&1 | grep --line-buffered -v "^\[transformers\]" | tee "$out/gpu-tests-pd.log" | tail -30 ;;
esac
