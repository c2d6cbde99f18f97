"""Does an eager lm_head GEMM (Qwen3-8B's shape) of a row count not run before block the host while other work
runs on the GPU? The PD-multiplex stall probe found the decode steps' slow launches inside `compute_logits`.
Per M: enqueue ~20 ms of GEMMs on a side stream (plain, or a green-context partition of 84 SMs, where PD
multiplexing runs its prefill), then time the host side of F.linear(h[:M], W).float(); calls over 2 ms are
listed. Passes: first use of each M beside a plain stream, beside the partition; second use; on a new stream;
on the decode partition's stream. Writes $OUT/first-gemm.json. Usage: OUT=dir python3 scripts/probe_first_gemm.py
"""
import json
import os
import time

import torch

from splitserve.pipeline import green

dev = torch.device("cuda", 0)
torch.cuda.init()
W = torch.randn(151936, 4096, device=dev, dtype=torch.bfloat16) * 0.02
h = torch.randn(256, 4096, device=dev, dtype=torch.bfloat16)
A = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
part = green.split(dev, 48)
plain_side = torch.cuda.Stream()
res = {}


def busy(stream, n=14):
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(n):
            A @ A


def run(label, side, ms=range(1, 257), stream=None):
    slow, total = [], 0.0
    for m in ms:
        if side is not None:
            busy(side)
        t = time.perf_counter()
        with torch.cuda.stream(stream or torch.cuda.current_stream()):
            torch.nn.functional.linear(h[:m], W).float()
        dt = (time.perf_counter() - t) * 1e3
        total += dt
        if dt > 2:
            slow.append((m, round(dt, 1)))
        torch.cuda.synchronize()
    res[label] = {"slow": slow, "host_ms_total": round(total, 1)}
    print(label, "slow calls:", len(slow), slow[:30], flush=True)


busy(plain_side)
torch.cuda.synchronize()
t = time.perf_counter()
busy(plain_side)
torch.cuda.synchronize()
res["side_work_ms"] = (time.perf_counter() - t) * 1e3
print("side work ms", res["side_work_ms"])
run("1 first use, side on a plain stream", plain_side, range(1, 129))
run("2 first use, side on a green partition (84 SMs)", part.compute_stream, range(129, 257))
run("3 second use, side on green", part.compute_stream)
s2 = torch.cuda.Stream()
run("4 second use on a new stream, side on green", part.compute_stream, stream=s2)
run("5 on the green decode stream, side on green", part.compute_stream, stream=part.memory_stream)
with open(os.path.join(os.environ.get("OUT", "."), "first-gemm.json"), "w") as f:
    json.dump(res, f, indent=1)
