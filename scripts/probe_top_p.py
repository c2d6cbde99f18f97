"""Device time of the top-p floor kernel (kernels/top_p.py) alone, by the number of thresholds per pass (2 = a
bisection, 31 passes; 16 = 8 passes) and block size, against the sort that the sampler used before it, at batch
64 x the Qwen3 vocabulary (flat rows, as random weights give, and peaked ones). Writes $OUT/top-p-kernel.json.
Usage: OUT=dir python3 scripts/probe_top_p.py"""
import json
import os

import torch
import triton

from splitserve.bench.timing import median_time
from splitserve.kernels import top_p

B, V = 64, 151936
dev = torch.device("cuda")


def cuda_time_ms(fn) -> float:  # a synchronized call: includes a launch and a sync (~0.02 ms)
    return median_time(fn, dev, iters=30, warmup=3) * 1e3


results = {}
for name, scale in (("flat", 0.05), ("peaked", 4.0)):
    probs = (torch.randn(B, V, device="cuda") * scale).softmax(-1)
    target = torch.full((B,), 0.95, device="cuda")
    floor = torch.empty(B, device="cuda")
    def by_sort(probs=probs):
        s = probs.sort(-1, descending=True).values
        return (s.cumsum(-1) - s) < 0.95
    row = {"sort + scan (previous sampler)": cuda_time_ms(by_sort)}
    for ways in (2, 4, 8, 16):
        for block, warps in ((1024, 8), (2048, 8), (4096, 8), (4096, 16)):
            if ways * block > 32768:
                continue
            def run(ways=ways, block=block, warps=warps, probs=probs, target=target, floor=floor):
                top_p._top_p_floor_kernel[(B,)](probs, target, floor, V, BLOCK=block, WAYS=ways, num_warps=warps)
            row[f"ways {ways}, block {block}, warps {warps}"] = cuda_time_ms(run)
    results[name] = row
    print(name, json.dumps({k: round(v, 4) for k, v in row.items()}, indent=1), flush=True)
results["device"] = torch.cuda.get_device_name()
results["triton"] = triton.__version__
with open(os.path.join(os.environ.get("OUT", "."), "top-p-kernel.json"), "w") as f:
    json.dump(results, f, indent=1)
