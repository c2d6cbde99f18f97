#!/usr/bin/env bash
# Issue-3 benchmark run on one GPU: P1/P4 (latency, Qwen3-8B shape), P2 (smallbatch), P3 (throughput).
# Results go to ${OUT:-docs/benchmarks}.
set -uo pipefail
out=${OUT:-docs/benchmarks}
export PYTHONUNBUFFERED=1
python3 -m splitserve bench smallbatch --shape qwen3-0.6b --compare hf --out "$out" --name smallbatch
python3 -m splitserve bench throughput --shape qwen3-0.6b --compare hf --hf-requests 64 --out "$out" --name throughput
python3 -m splitserve bench latency --shape qwen3-8b --batch-sizes 1 16 64 256 --context-lens 256 1024 2048 \
  --max-num-seqs 256 --out "$out" --name latency-qwen3-8b
