#!/usr/bin/env bash
# Tenth session (issue 15): decode's projections as one Triton GEMV with the norm / SiLU fused in front.
#   PART=a  the GEMV's GPU tests and the bf16/fp32 HF tests; then cuBLAS | GEMV | cuBLAS A/B of the decode graph
#           (scripts/gpu_fused_ab.py) on Qwen3-8B (P1 / P11's batch 1) and Qwen3-0.6B (P2's batch 4, smallbatch)
#   PART=b  the fused input ops' cost per shape (scripts/probe_gemv.py --prologues), then the 8B A/B with the
#           unfused GEMV as a variant too
#   PART=c  programmatic dependent launch in a chain of GEMVs (scripts/probe_gemv.py --pdl)
#   PART=d  the GEMV's GPU tests, HF parity, split-K; A/B cublas | gemv | gemv + 64-key splits | cublas, 8B and 0.6B
#   PART=e  issue 15's goals against hf-compiled in the same run: P2 (smallbatch), P1 / P11 (latency, 8B batch 1)
#   PART=f  P4 (latency, 8B batch 256, ctx 2048), then the whole GPU suite
#   PART=g  where P4's step goes: kernel times by kind (8B, batch 256, ctx 2048) and decode attention's launch swept
# Usage: OUT=folder PART=a bash scripts/gpu_s10.sh (as a device call with a 600 s limit)
set -uo pipefail
out=${OUT:-docs/benchmarks/s10}
source scripts/gpu_env.sh
if [[ ${PART:-a} == a ]]; then
  stamp "GPU tests: the GEMV, HF parity, graphs"
  timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --tb=short \
    -k "gemv or bf16_logits or fp32_greedy or graph_path_equals or fused" 2>&1 | tail -15 | tee "$out/gpu-tests-a.log"
  stamp "A/B, Qwen3-8B"
  timeout 200 python3 scripts/gpu_fused_ab.py qwen3-8b "$out/gemv-ab-qwen3-8b.json" --points 1:1024 1:128 4:1024 \
    16:1024 2>&1 | grep --line-buffered -v "latency:" | quiet | tail -8
  stamp "A/B, Qwen3-0.6B"
  timeout 150 python3 scripts/gpu_fused_ab.py qwen3-0.6b "$out/gemv-ab-qwen3-0.6b.json" --points 4:128 1:1024 \
    16:1024 --smallbatch 2>&1 | grep --line-buffered -v "latency:" | quiet | tail -8
fi
if [[ ${PART:-a} == b ]]; then
  stamp "probe: the fused input ops' cost"
  timeout 300 python3 scripts/probe_gemv.py "$out/probe-gemv-prologues.json" --prologues 2>&1 | grep -v Warning
  stamp "A/B, Qwen3-8B"
  timeout 220 python3 scripts/gpu_fused_ab.py qwen3-8b "$out/gemv-ab-qwen3-8b.json" --points 1:1024 4:1024 \
    16:1024 2>&1 | grep --line-buffered -v "latency:" | quiet | tail -5
fi
if [[ ${PART:-a} == c ]]; then
  stamp "probe: PDL in a chain of GEMVs"
  timeout 200 python3 scripts/probe_gemv.py "$out/probe-gemv-pdl.json" --pdl 2>&1 | grep -v Warning
fi
if [[ ${PART:-a} == d ]]; then
  stamp "GPU tests: the GEMV, HF parity, graphs, split-K"
  timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --tb=short \
    -k "gemv or bf16_logits or fp32_greedy or graph_path_equals or fused or split_k" 2>&1 | tail -15 \
    | tee "$out/gpu-tests-d.log"
  stamp "A/B, Qwen3-8B"
  timeout 220 python3 scripts/gpu_fused_ab.py qwen3-8b "$out/gemv-ab2-qwen3-8b.json" --points 1:1024 1:128 4:1024 \
    16:1024 2>&1 | grep --line-buffered -v "latency:" | quiet | tail -6
  stamp "A/B, Qwen3-0.6B"
  timeout 150 python3 scripts/gpu_fused_ab.py qwen3-0.6b "$out/gemv-ab2-qwen3-0.6b.json" --points 4:128 1:1024 \
    --smallbatch 2>&1 | grep --line-buffered -v "latency:" | quiet | tail -5
fi
if [[ ${PART:-a} == e ]]; then
  stamp "P2: smallbatch against hf-compiled"
  timeout 200 python3 -m splitserve bench smallbatch --shape qwen3-0.6b --compare hf-compiled --out "$out" \
    --name smallbatch-p2 2>&1 | quiet | tail -8
  stamp "P11 / P1: latency, Qwen3-8B batch 1, against hf-compiled"
  timeout 300 python3 -m splitserve bench latency --shape qwen3-8b --batch-sizes 1 --context-lens 1024 \
    --compare hf-compiled --out "$out" --name latency-8b-b1-p11 2>&1 | quiet | tail -10
fi
if [[ ${PART:-a} == f ]]; then
  stamp "P4: latency, Qwen3-8B batch 256, ctx 2048"
  timeout 150 python3 -m splitserve bench latency --shape qwen3-8b --batch-sizes 256 --context-lens 2048 \
    --max-num-seqs 256 --out "$out" --name latency-8b-b256-p4 2>&1 | quiet | tail -5
  stamp "the whole GPU suite"
  timeout 420 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --tb=short 2>&1 | tail -25 \
    | tee "$out/gpu-tests.log"
fi
if [[ ${PART:-a} == g ]]; then
  stamp "profile: Qwen3-8B batch 256 ctx 2048, kernel times by kind"
  timeout 150 python3 scripts/profile_decode.py qwen3-8b 256 2048 "$out/profile-8b-b256-ctx2048.json" 2>&1 \
    | quiet | grep -v Warning | tail -25
  stamp "decode attention's launch, 8B heads, batch 256, ctx 2048"
  timeout 150 python3 scripts/probe_attention_launch.py "$out/probe-attention-launch-b256-ctx2048.json" 2>&1 \
    | grep -v Warning
fi
stamp "done"
rm -f "$out"/*.png
