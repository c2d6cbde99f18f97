#!/usr/bin/env bash
# Issue 13 on one GPU: colocated with chunked prefill at 512/2048/8192 vs PD multiplexing, same arrivals.
# Default: 4 setups x 3 rates x 32 s (arrivals measured in 6-22 s): 7.2 minutes on an H200 (Qwen3-8B shape,
# 2026-11-30); the JSON is rewritten after each setup, so a run cut short keeps what it measured.
# Usage: OUT=folder SHAPE=qwen3-8b RATES="3 6 9" DURATION=32 bash scripts/gpu_pdmux.sh [more bench flags]
set -uo pipefail
out=${OUT:-docs/benchmarks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
python3 -m splitserve doctor > "$out/doctor-pdmux.txt" 2>&1
python3 -m splitserve bench pdmux --shape "${SHAPE:-qwen3-8b}" --request-rates ${RATES:-3 6 9} \
  --duration-s "${DURATION:-32}" --warmup-s 6 --drain-s 10 --out "$out" --name "pdmux-${SHAPE:-qwen3-8b}" "$@" 2>&1 \
  | grep --line-buffered -v "^\[transformers\]"
