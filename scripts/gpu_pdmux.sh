#!/usr/bin/env bash
# Issue 13 on one GPU: colocated with chunked prefill at 512/2048/8192 vs PD multiplexing, same arrivals.
# Default: 4 setups x 2 rates x 40 s, about 8 minutes on an H200 (Qwen3-8B shape); the JSON is rewritten
# after each setup, so a run cut short keeps what it measured.
# Usage: OUT=folder SHAPE=qwen3-8b RATES="2 4" DURATION=40 bash scripts/gpu_pdmux.sh [more bench flags]
set -uo pipefail
out=${OUT:-docs/benchmarks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
python3 -m splitserve doctor > "$out/doctor-pdmux.txt" 2>&1
python3 -m splitserve bench pdmux --shape "${SHAPE:-qwen3-8b}" --request-rates ${RATES:-2 4} \
  --duration-s "${DURATION:-40}" --out "$out" --name "pdmux-${SHAPE:-qwen3-8b}" "$@" 2>&1 \
  | grep --line-buffered -v "^\[transformers\]"
