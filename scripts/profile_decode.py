"""Where a decode step's GPU time goes: kernel times by kind (torch.profiler, eager so kernels are visible).

Usage: python3 scripts/profile_decode.py SHAPE BATCH CTX [OUT.json]
"""

import json
import sys
from collections import defaultdict

import torch

from splitserve import LLM
from splitserve.bench.shapes import shape_folder
from splitserve.worker.inputs import fake_batch

KINDS = (("gemm", ("gemm", "gemv", "cutlass", "sm90", "nvjet", "cublas")), ("attention", ("paged_attention", "merge")),
         ("norm/rope/act", ("rms_norm", "rotary", "silu")), ("kv store", ("store_kv", "kv_store")),
         ("q/k-norm+rope+kv store", ("qk_norm_rope_store",)),
         ("sampling", ("argmax", "reduce", "max")))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def main() -> None:
    shape, batch, ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    llm = LLM(shape_folder(shape), load_format="dummy", enforce_eager=True, max_model_len=ctx + 16,
              max_num_seqs=max(batch, 1), gpu_memory_utilization=0.8)
    runner = llm.engine.core.runner
    step = fake_batch(batch, ctx, runner.block_size, runner.num_kv_blocks)
    for _ in range(5):
        runner.execute(step)
    torch.cuda.synchronize()
    iters = 10
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            runner.execute(step)
        torch.cuda.synchronize()
    per_kind, count = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kind_of(e.name)
            per_kind[k] += e.device_time / iters / 1e3  # ms per step
            count[k] += 1
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    result = {"shape": shape, "batch": batch, "ctx": ctx, "device": torch.cuda.get_device_name(),
              "ms_per_step_by_kind": dict(per_kind), "kernels_per_step": {k: v // iters for k, v in count.items()},
              "kernel_ms_total": sum(per_kind.values()), "weight_bytes": weight_bytes}
    print(json.dumps(result, indent=1))
    if len(sys.argv) > 4:
        with open(sys.argv[4], "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
