#!/usr/bin/env bash
# Eleventh session (issue 13): the PD plan measured at two decode contexts, the split chosen for the decode
# batch's mean context; serving around P9's rate with the decode GEMV / split-K / tile changes of issue 15.
#   PART=a  the PD-multiplex and green-context GPU tests; bench pdmux colocated-512, pdmux, pdmux-itl10 at 7, 9
#   PART=b  bench pdmux, issue 13's table: colocated-512 / 2048 / 8192 and pdmux at 7 and 9 req/s
#   PART=d  cuBLAS on a partition: default, cuBLASLt, cuBLASLt told the partition's SM count
#           (scripts/probe_carveout.py); the PD calibration test again
#   PART=f  the PD GPU tests again; bench pdmux, prefill chunk 8192 against 4096 at 7 and 9 req/s
#   PART=e  the PD calibration test alone, with Python tracebacks after 100 s
#   PART=c  bench pdmux, more rates for the setups part a and b single out (SETUPS, RATES, MORE: extra flags)
# Usage: OUT=folder PART=a bash scripts/gpu_s11.sh (as a device call with a 600 s limit). Call 4 of the
# session was PART=c SETUPS="colocated-512 pdmux pdmux-itl12 pdmux-4096" RATES="7 9"
#   MORE="--max-num-batched-tokens 2048 --pdmux-itl-targets 12 --pdmux-chunks 4096"
set -uo pipefail
out=${OUT:-docs/benchmarks/s11}
source scripts/gpu_env.sh
bench() {  # $1: time limit, $2: result name, then bench flags
  timeout "$1" python3 -m splitserve bench pdmux --shape qwen3-8b --duration-s 30 --warmup-s 6 --drain-s 10 \
    --out "$out" --name "$2" "${@:3}" 2>&1 | quiet | tail -14
}
if [[ ${PART:-a} == a ]]; then
  stamp "GPU tests: PD multiplexing, green partitions"
  timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --tb=short \
    -k "pd_multiplex or green_partitions" 2>&1 | tail -15 | tee "$out/gpu-tests-a.log"
  stamp "bench pdmux"
  bench 330 pdmux-qwen3-8b-a --setups colocated-512 pdmux pdmux-itl10 --pdmux-itl-targets 10 --request-rates 7 9
elif [[ ${PART:-a} == b ]]; then
  stamp "bench pdmux: issue 13's table"
  bench 570 pdmux-qwen3-8b --setups colocated-512 pdmux colocated-2048 colocated-8192 --request-rates 7 9
elif [[ ${PART:-a} == d ]]; then
  stamp "probe: cuBLAS SM target on partitions"
  timeout 240 python3 scripts/probe_carveout.py "$out/carveout.json" 2>&1 | quiet | tail -12
  stamp "GPU test: PD calibration"
  timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --tb=short \
    -k "pd_multiplex_calibrates" 2>&1 | grep -v "^INFO\|^[0-9]* | \|^-----" | tail -30 | tee "$out/gpu-tests-d.log"
elif [[ ${PART:-a} == e ]]; then
  stamp "GPU test: PD calibration, with tracebacks after 100 s"
  timeout 170 python3 -m pytest -q -s -m gpu tests/test_gpu.py -p no:cacheprovider --tb=short \
    -o faulthandler_timeout=100 --durations=5 -k "pd_multiplex_calibrates" > "$out/gpu-tests-e.log" 2>&1
  grep -v "^INFO\|^[0-9]* | \|^-----" "$out/gpu-tests-e.log" | tail -60
elif [[ ${PART:-a} == f ]]; then
  stamp "GPU tests: PD multiplexing, green partitions"
  timeout 170 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --tb=short \
    -k "pd_multiplex or green_partitions" > "$out/gpu-tests-f.log" 2>&1
  grep -v "^INFO\|^[0-9]* | \|^-----" "$out/gpu-tests-f.log" | tail -25
  stamp "bench pdmux: prefill chunk 8192 against 4096"
  bench 330 pdmux-qwen3-8b-f --setups pdmux pdmux-4096 --pdmux-chunks 4096 --request-rates 7 9
else
  stamp "bench pdmux: more rates"
  # shellcheck disable=SC2086
  bench 570 pdmux-qwen3-8b-c --setups ${SETUPS:-colocated-512 pdmux} --request-rates ${RATES:-6.5 7.5 10} ${MORE:-}
fi
stamp done
