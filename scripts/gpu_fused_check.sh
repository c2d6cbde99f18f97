#!/usr/bin/env bash
# Issue 15's launch cuts on one GPU, in one call (<= 6 minutes on an H200):
#   1. the GPU tests that touch them: the fused q/k-norm + rotary + KV store kernel (bf16/fp16/fp32 vs the
#      torch reference), the attention and split-K kernels, fused-vs-unfused graphs
#      token-equal in fp32, graph == eager, fp32 greedy == HF exactly;
#   2. A/B of the decode step, each switch alone, in one process per shape (scripts/gpu_fused_ab.py):
#      off | fused_qkv | off_again; graph GPU ms, wall ms and kernels per replay.
#      Qwen3-8B: batch 1 ctx 1024 (P1), batch 256 ctx 2048 (P4), batch 1 ctx 128, batch 16 ctx 1024.
#      Qwen3-0.6B: batch 64 ctx 1024 and 128, batch 4 ctx 128, and the 4 x 64 small-batch workload (P2).
# Usage: OUT=folder [PART=all|tests|ab8b|ab06b] bash scripts/gpu_fused_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-fused-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
part=${PART:-all}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
if [ "$part" = all ] || [ "$part" = tests ]; then
  timeout 150 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_gpu.py -p no:cacheprovider -rf \
    -k "fused or split_k or triton_kernels_match or fp32_greedy or cuda_graph_path" 2>&1 \
    | grep --line-buffered -v "^\[transformers\]" | tee "$out/gpu-tests.log" | tail -15
fi
if [ "$part" = all ] || [ "$part" = ab8b ]; then
  timeout 125 python3 scripts/gpu_fused_ab.py qwen3-8b "$out/ab-qwen3-8b.json" \
    --points 1:1024 256:2048 1:128 16:1024 2>&1 | grep --line-buffered -v "latency:" | tail -14
fi
if [ "$part" = all ] || [ "$part" = ab06b ]; then
  timeout 80 python3 scripts/gpu_fused_ab.py qwen3-0.6b "$out/ab-qwen3-0.6b.json" \
    --points 64:1024 64:128 4:128 --smallbatch 2>&1 | grep --line-buffered -v "latency:" | tail -12
fi
ls -l "$out"
