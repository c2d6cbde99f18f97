#!/usr/bin/env bash
# Issue 13 on one GPU, first look (≤ 9 minutes): the PD-multiplex GPU tests (and the graph tests its
# DecodeGraphs change touches), then a Qwen3-8B-shape engine with the mode on: its calibrated plan (decode step
# alone vs on each candidate partition beside a prefill), and a short burst of long prompts beside decodes.
# Usage: OUT=folder bash scripts/gpu_pdmux_check.sh   (needs xgrammar on PYTHONPATH for the json test only)
set -uo pipefail
out=${OUT:-/tmp/pdmux}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false SPLITSERVE_CACHE=$out/cache PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
t0=$(date +%s)
stamp() { echo "=== $1 ($(( $(date +%s) - t0 )) s)"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"

stamp "gpu tests"
timeout 300 python3 -m pytest -q -m gpu tests/test_gpu.py -x -p no:cacheprovider \
  -k "pd_multiplex or green_partitions or cuda_graph_path or n_completions" 2>&1 | tail -25

stamp "qwen3-8b plan + burst"
timeout 240 python3 scripts/pdmux_probe.py --shape qwen3-8b --out "$out/probe-qwen3-8b.json" 2>&1 \
  | grep -v "^\[transformers\]" | tail -40
stamp "done"
