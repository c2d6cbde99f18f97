"""Host time per engine step on CPU with a micro model (the model itself costs little), for comparing step
loops: python3 scripts/host_step_overhead.py [--async-scheduling on|off] [--batch B] [--steps N]

Prints the median and mean wall µs per `LLMEngine.step()` over the decode steps (front end included), less
the model's forward (the CPU attention loop would drown the rest; lm_head and sampling stay in). On CPU
nothing overlaps, so this measures the loop's bookkeeping, not the overlap it buys on a GPU."""

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
import transformers

from splitserve import LLM, SamplingParams
from splitserve.models.loader import resolve_model

parser = argparse.ArgumentParser()
parser.add_argument("--async-scheduling", choices=["on", "off"], default=None)
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()

folder = os.path.join(tempfile.gettempdir(), "splitserve-micro-model-v2")
if not os.path.exists(os.path.join(folder, "config.json")):
    cfg = transformers.Qwen3Config(vocab_size=2048, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                   max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1,
                                   eos_token_id=2)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).float().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = os.path.join(resolve_model(None), name)
        if os.path.exists(src):
            shutil.copy(src, folder)

kwargs = {} if args.async_scheduling is None else {"async_scheduling": args.async_scheduling == "on"}
llm = LLM(folder, device="cpu", cpu_threads=1, num_kv_blocks=1024, **kwargs)
engine = llm.engine
model = engine.core.runner.model
forward, model_s = model.forward, [0.0]


def timed_forward(*a, **k):  # the model's own time, subtracted to leave the host work around it
    t0 = time.perf_counter()
    try:
        return forward(*a, **k)
    finally:
        model_s[0] += time.perf_counter() - t0


model.forward = timed_forward
params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
all_times = []
for _ in range(args.repeats):
    reqs = [engine.add_request([3 + (i * 7 + j) % 1000 for j in range(16)], params) for i in range(args.batch)]
    engine.step()
    engine.step()  # prefill (and, async, its first resolve)
    times = []
    while not all(q.is_finished for q in reqs):
        model_s[0] = 0.0
        t0 = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t0 - model_s[0]) * 1e6)
    for q in reqs:
        engine.release(q)
    all_times += times[5:]
print(f"async_scheduling={llm.stats().get('async_scheduling', 'n/a')} batch={args.batch}: "
      f"µs/step median {statistics.median(all_times):.0f} mean {statistics.mean(all_times):.0f} "
      f"({len(all_times)} steps)")
