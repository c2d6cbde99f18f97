#!/usr/bin/env bash
# M1 on two GPUs: PD GPU test, doctor, and the serving simulation (colocated vs data-parallel vs PD).
# Usage: OUT=folder SHAPE=qwen3-8b N=120 RATES="4 8 16 inf" bash scripts/gpu_pd.sh
set -uo pipefail
out=${OUT:-docs/benchmarks}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
python3 -m splitserve doctor | tee "$out/doctor-pd.txt"
if [ "${TESTS:-1}" = 1 ]; then
  python3 -m pytest -q -m gpu tests/test_gpu.py -k "pd_two_gpus" -p no:cacheprovider 2>&1 | tail -5 | tee "$out/gpu-tests-pd.log"
fi
python3 -m splitserve bench pd --shape "${SHAPE:-qwen3-8b}" --num-requests "${N:-120}" \
  --input-range 512 4096 --output-range 64 512 --request-rates ${RATES:-4 8 16 inf} \
  --out "$out" --name "pd-${SHAPE:-qwen3-8b}" 2>&1 | grep -v "^\[transformers\]"
