"""Decode attention bandwidth on the whole GPU vs on a green-context partition, over kernel launch variants.

The pipeline's attention stage runs on a part of the SMs; it can only win if attention keeps most of the
HBM bandwidth there. Usage: python scripts/probe_attention_partition.py [BATCH] [CTX] [SMS...]
"""

import itertools
import json
import os
import sys

import torch

from splitserve.kernels.paged_attention import paged_attention
from splitserve.pipeline import green

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 512
ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 512
sms_list = [int(x) for x in sys.argv[3:]] or [48, 64, 80]
dev = torch.device("cuda", 0)
heads, kv_heads, dim, bs = 32, 8, 128, 16  # Qwen3-8B attention
blocks_per_seq = -(-ctx // bs)
num_blocks = 200_000
k_cache = torch.randn(num_blocks, bs, kv_heads, dim, device=dev, dtype=torch.bfloat16)
v_cache = torch.randn_like(k_cache)
tables = (torch.arange(batch, device=dev)[:, None] * blocks_per_seq
          + torch.arange(blocks_per_seq, device=dev)[None, :]).int() % num_blocks
q = torch.randn(batch, heads, dim, device=dev, dtype=torch.bfloat16)
qsl = torch.arange(batch + 1, device=dev, dtype=torch.int32)
lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
nbytes = 2 * batch * ctx * kv_heads * dim * 2


def run(launch, stream):
    with torch.cuda.stream(stream):
        return paged_attention(q, k_cache, v_cache, tables, qsl, lens, 1, ctx, dim**-0.5, num_splits=1,
                               launch=launch)


def bandwidth(launch, stream) -> float:
    ref = run({}, stream)
    out = run(launch, stream)
    stream.synchronize()
    assert (out.float() - ref.float()).abs().max() < 2e-2, launch
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(10):
            run(launch, stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):  # replayed on the current stream: the graph keeps the partition it was captured on
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 10)
    return nbytes / (sorted(times)[2] / 1e3) / 1e9


variants = [dict(BLOCK_N=n, num_warps=w, num_stages=st) for n, w, st in itertools.product((64, 128), (4, 8), (2, 3, 4))]
streams = {"all": torch.cuda.Stream()}
for sms in sms_list:
    part = green.split(dev, sms)
    streams[f"{part.attention_sm}"] = part.attention_stream
    streams[f"_keep{sms}"] = part  # keep the green context alive
results = []
for v in variants:
    row = {"variant": v}
    try:
        for name, stream in streams.items():
            if not name.startswith("_"):
                row[name] = round(bandwidth(v, stream))
    except Exception as e:  # a variant that does not compile (shared memory) is reported, not fatal
        row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
    results.append(row)
    print(row, flush=True)
best = {name: max((r for r in results if name in r), key=lambda r: r[name]) for name in streams
        if not name.startswith("_")}
print("best per partition:", json.dumps(best))
out = os.environ.get("OUT")
if out:
    with open(os.path.join(out, f"attention-partition-b{batch}-ctx{ctx}.json"), "w") as f:
        json.dump({"batch": batch, "ctx": ctx, "GBps": results, "best": best}, f, indent=1)
