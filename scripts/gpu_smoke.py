"""Quick GPU numbers for the core engine (not the benchmark suite): startup, graphs, decode and throughput."""

import json
import os
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_gpu import QWEN3_06B  # noqa: E402

from splitserve import LLM, SamplingParams  # noqa: E402

out_dir = os.environ.get("OUT", "/tmp")
path = "/tmp/qwen3-0.6b-random"
if not os.path.exists(path):
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3_06B)).to(torch.bfloat16).save_pretrained(path)

t0 = time.perf_counter()
llm = LLM(path, max_model_len=4096)
startup = time.perf_counter() - t0
stats = llm.stats()
g = torch.Generator().manual_seed(0)
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "startup_s": startup,
       "graph_capture_s": stats["graph_capture_time_s"], "graph_mem_gib": stats["graph_memory_bytes"] / 2**30,
       "kv_cache_tokens": stats["kv_cache_tokens"]}

# original-system workload: 4 prompts, 64 new tokens
prompts = [torch.randint(0, 151936, (32,), generator=g).tolist() for _ in range(4)]
params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
llm.generate(prompts, params, use_tqdm=False)
t = time.perf_counter()
outs = llm.generate(prompts, params, use_tqdm=False)
total = time.perf_counter() - t
ttft = max(o.metrics.time_to_first_token for o in outs)
res["smallbatch_decode_tok_s"] = 4 * 63 / (total - ttft)

# nano-vllm workload: 256 requests, 100-1024 in, 100-1024 out
n = 256
ins = torch.randint(100, 1025, (n,), generator=g).tolist()
outs_len = torch.randint(100, 1025, (n,), generator=g).tolist()
prompts = [torch.randint(0, 151936, (k,), generator=g).tolist() for k in ins]
params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in outs_len]
t = time.perf_counter()
llm.generate(prompts, params, use_tqdm=False)
res["throughput_tok_s"] = sum(outs_len) / (time.perf_counter() - t)
print(json.dumps(res, indent=1))
with open(os.path.join(out_dir, "smoke.json"), "w") as f:
    json.dump(res, f, indent=1)
