#!/usr/bin/env bash
# Issue-5 benchmark on one GPU: plain decode graph vs the pipeline on each SM split vs the planner, for the
# Qwen3-8B and Qwen3-0.6B shapes (P5, P6), and the growing-context run (M3). Results go to ${OUT:-docs/benchmarks}.
set -uo pipefail
out=${OUT:-docs/benchmarks}
export PYTHONUNBUFFERED=1
python3 -m splitserve bench pipeline --iters 5 --m3-step 256 --out "$out" --name pipeline "$@"
