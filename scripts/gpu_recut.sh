#!/usr/bin/env bash
# Issue 14 (compute/memory re-cut of the decode pipeline) on one GPU, in one call of at most 9 minutes:
#   probe   scripts/probe_recut.py: each stage and each of its kernels alone on all SMs, alone on its
#           partition, and beside the other stage, memory partitions 24-64 SMs; Qwen3-8B at batch 1024 ×
#           ctx 512 and 512 × 1024 (the mock's points in GPU-FACTS.md)                         (≤ 2.7 min)
#   bench8  `splitserve bench pipeline`, Qwen3-8B: batch 16…1024 × ctx 256…4096, memory partitions of
#           32/40/48/64 SMs × first micro-batch 0.5/0.6/0.7 of the batch, the planner (P5, P6), and the
#           growing-context run (M3)                                                            (≤ 4.3 min)
#   bench06 the same grid for Qwen3-0.6B: the planner's candidate splits, even halves, no M3  (≤ 1.8 min)
# Results go to ${OUT:-docs/benchmarks}: recut-probe.json, pipeline-qwen3-8b.{json,md,png},
# pipeline-qwen3-0.6b.{json,md,png}, recut.log (8 files). PART=probe|bench8|bench06 runs one part.
# Each part has its own time limit (estimates, not measured yet: 530 s in all), so one that overruns
# leaves the others' results; run it again alone with PART=.
set -uo pipefail
out=${OUT:-docs/benchmarks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
part=${PART:-all}
log="$out/recut.log"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee -a "$log"

if [[ $part == all || $part == probe ]]; then
  # the first run also compiles the Triton kernels (cached for everything after it)
  for point in "100 1024 512" "60 512 1024"; do
    read -r limit batch ctx <<<"$point"
    timeout "$limit" python3 scripts/probe_recut.py qwen3-8b "$batch" "$ctx" 24 32 40 48 64 2>&1 \
      | grep --line-buffered -v "^\[transformers\]" | tee -a "$log" | tail -8
  done
  python3 - "$out" <<'EOF'  # one file for both points (what comes back from $OUT is at most 8 files)
import glob, json, os, sys
paths = sorted(glob.glob(os.path.join(sys.argv[1], "recut-qwen3-8b-b*-ctx*.json")))
if paths:
    with open(os.path.join(sys.argv[1], "recut-probe.json"), "w") as f:
        json.dump({os.path.basename(p): json.load(open(p)) for p in paths}, f, indent=1)
    for p in paths:
        os.remove(p)
EOF
fi
if [[ $part == all || $part == bench8 ]]; then
  timeout 260 python3 -m splitserve bench pipeline --shapes qwen3-8b --splits 32 40 48 64 \
    --microbatch-fractions 0.5 0.6 0.7 --iters 5 --m3-batch 1024 --m3-step 256 --out "$out" \
    --name pipeline-qwen3-8b 2>&1 | grep --line-buffered -v "^\[transformers\]" | tee -a "$log" | tail -12
fi
if [[ $part == all || $part == bench06 ]]; then
  timeout 110 python3 -m splitserve bench pipeline --shapes qwen3-0.6b --iters 5 --m3-batch 0 --out "$out" \
    --name pipeline-qwen3-0.6b 2>&1 | grep --line-buffered -v "^\[transformers\]" | tee -a "$log" | tail -12
fi
