# Sourced by the device-call scripts (gpu_followup.sh, gpu_s8.sh) after they set `out`: the folder, the device's
# name in it, the xgrammar wheels from .whl/, the environment, and the helpers stamp, quiet and sampling.
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false SPLITSERVE_CACHE=/tmp/sscache
export SPLITSERVE_TEST_QWEN_TOKENIZER=$PWD/.gpu/qwen-tokenizer
t0=$(date +%s)
stamp() { echo "=== $1 ($(( $(date +%s) - t0 )) s)"; }
quiet() { grep --line-buffered -v "^\[transformers\]"; }
sampling() {  # bench sampling, 0.6B batch 64: plain, penalties, JSON; $1: time limit, then more options
  timeout "$1" python3 -m splitserve bench sampling --shape qwen3-0.6b --sampling-batch 64 --prompt-len 256 \
    --new-tokens 256 --modes plain penalties json --tokenizer "$PWD/.gpu/qwen-tokenizer" \
    --gpu-memory-utilization 0.45 --out "$out" --name sampling "${@:2}" 2>&1 | quiet | tail -6
}
