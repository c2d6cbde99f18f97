#!/usr/bin/env bash
# Async scheduling on one GPU, in one call (~4-5 minutes): the GPU tests, then an A/B of async_scheduling
# on vs off in the same run: smallbatch (Qwen3-0.6B shape, 4 x 64) and latency (Qwen3-8B shape, batch 1 and
# 256, ctx 1024; with async on, the bench launches each step before resolving the previous one).
# Usage: OUT=folder bash scripts/gpu_async_check.sh   (OUT defaults to ./gpu-async-check)
set -uo pipefail
out=${OUT:-gpu-async-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"

timeout 130 python3 -m pytest -q -m gpu tests/test_gpu.py -k "not pd_two_gpus" -p no:cacheprovider 2>&1 \
  | grep --line-buffered -v "^\[transformers\]" | tee "$out/gpu-tests.log" | tail -15

for mode in async-scheduling no-async-scheduling; do
  timeout 45 python3 -m splitserve bench smallbatch --shape qwen3-0.6b --"$mode" --out "$out" \
    --name "smallbatch-$mode" > "$out/smallbatch-$mode.log" 2>&1
  echo "== smallbatch --$mode (rc $?)"; tail -4 "$out/smallbatch-$mode.log"
done
for mode in async-scheduling no-async-scheduling; do
  timeout 60 python3 -m splitserve bench latency --shape qwen3-8b --batch-sizes 1 256 --context-lens 1024 \
    --max-num-seqs 256 --"$mode" --out "$out" --name "latency-qwen3-8b-$mode" > "$out/latency-$mode.log" 2>&1
  echo "== latency --$mode (rc $?)"; tail -6 "$out/latency-$mode.log"
done
python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None
rows = ["| metric | async on | async off | on / off |", "|---|---|---|---|"]
a, b = load("smallbatch-async-scheduling"), load("smallbatch-no-async-scheduling")
if a and b:
    rows.append(f"| smallbatch decode tok/s (0.6B, 4 x 64) | {a['decode_tok_s']:.0f} | {b['decode_tok_s']:.0f} "
                f"| {a['decode_tok_s'] / b['decode_tok_s']:.3f} |")
a, b = load("latency-qwen3-8b-async-scheduling"), load("latency-qwen3-8b-no-async-scheduling")
if a and b:
    for pa, pb in zip(a["points"], b["points"]):
        if "ms_per_step" in pa and "ms_per_step" in pb:
            rows.append(f"| 8B ms/step batch {pa['batch']} ctx {pa['ctx']} (graph GPU {pa.get('graph_gpu_ms', 0):.2f}) "
                        f"| {pa['ms_per_step']:.3f} | {pb['ms_per_step']:.3f} | {pa['ms_per_step'] / pb['ms_per_step']:.3f} |")
(out / "ab.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
