#!/usr/bin/env bash
# Issue 15's stronger peer and issue 19's sampling measurement, on one GPU, in one call (≤ 8 minutes):
#   1. bench sampling: Qwen3-0.6B shape, batch 64, 256-token prompts, 256 new tokens; plain vs penalties
#   2. bench smallbatch --compare hf-compiled: Qwen3-0.6B shape, 4 × 64 (P2)
#   3. bench latency --compare hf-compiled: Qwen3-8B shape, batch 1, ctx 1024 (P1, P11)
# Each writes JSON + markdown (+ PNG) into $OUT (default docs/benchmarks/peer-sampling) and is wrapped in
# `timeout`; a bench writes its own numbers before its peer starts, so a peer that hangs loses only itself.
# The engine runs at --gpu-memory-utilization 0.45 so the HF model fits beside it even if its memory were not
# returned (it is shut down first). torch.compile of the 8B HF model (reduce-overhead) takes ~1-2 minutes.
# Usage: OUT=folder bash scripts/gpu_peer_sampling.sh
set -uo pipefail
out=${OUT:-docs/benchmarks/peer-sampling}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
stamp() { echo "=== $1 ($(( $(date +%s) - t0 )) s)"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$out/device.txt"

stamp "sampling (Qwen3-0.6B, batch 64)"
timeout 90 python3 -m splitserve bench sampling --shape qwen3-0.6b --sampling-batch 64 --prompt-len 256 \
  --new-tokens 256 --modes plain penalties --gpu-memory-utilization 0.45 --out "$out" --name sampling 2>&1 \
  | grep -v "^\[transformers\]" | tail -12

stamp "smallbatch + hf-compiled (Qwen3-0.6B, 4 x 64)"
timeout 140 python3 -m splitserve bench smallbatch --shape qwen3-0.6b --compare hf-compiled \
  --gpu-memory-utilization 0.45 --out "$out" --name smallbatch-peer 2>&1 | grep -v "^\[transformers\]" | tail -10

stamp "latency + hf-compiled (Qwen3-8B, batch 1, ctx 1024)"
timeout 230 python3 -m splitserve bench latency --shape qwen3-8b --batch-sizes 1 --context-lens 1024 \
  --compare hf-compiled --gpu-memory-utilization 0.45 --out "$out" --name latency-peer-qwen3-8b 2>&1 \
  | grep -v "^\[transformers\]" | tail -12
stamp "done"
