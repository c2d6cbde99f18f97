"""Where a decode step's time goes: per-kernel GPU time of the plain graph vs a pipelined graph (torch.profiler).

The pipeline's stage events say which stream (memory or compute) is the bottleneck; this says which
kernels make it so, by comparing the same kernels on the whole GPU and on the partitions.
Usage: python scripts/profile_decode_step.py [SHAPE] [BATCH] [CTX] [MEMORY_SMS...]
"""

import json
import os
import re
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from splitserve import LLM
from splitserve.bench.shapes import shape_folder
from splitserve.pipeline import green
from splitserve.pipeline.planner import pingpong_on
from splitserve.pipeline.profiling import stage_times
from splitserve.worker.decode_graphs import PLAIN, pipeline_path

CATEGORIES = [("attention", r"paged_attention"), ("kv_write", r"kv|store"),
              ("gemm", r"gemm|nvjet|cutlass|xmma|sm90|cublas"), ("norm/rotary/act", r"rms|norm|rotary|silu|fused"),
              ("elementwise", r"elementwise|vectorized|copy|cat|add|mul")]


def category(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return cat
    return "other"


def kernel_times(graphs, path, bucket: int, replays: int = 3) -> dict:
    graph = graphs._graph(path, bucket).graph
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    by_name, by_cat = defaultdict(float), defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.time_range.elapsed_us() > 0:
            by_name[event.name] += event.time_range.elapsed_us() / 1e3 / replays  # ms per step
            by_cat[category(event.name)] += event.time_range.elapsed_us() / 1e3 / replays
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    return {"by_category_ms": dict(by_cat), "top_kernels_ms": top, "kernel_sum_ms": sum(by_cat.values())}


def main() -> None:
    shape = sys.argv[1] if len(sys.argv) > 1 else "qwen3-8b"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    ctx = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    splits = [int(x) for x in sys.argv[4:]] or [64]
    llm = LLM(shape_folder(shape), load_format="dummy", max_num_seqs=batch, max_model_len=ctx + 32,
              enable_prefix_caching=False, gpu_memory_utilization=0.8, decode_pipeline_profiling=True)
    runner = llm.engine.core.runner
    graphs = runner.graphs
    runner.kv_cache.normal_()
    report = {"shape": shape, "batch": batch, "ctx": ctx, "device": torch.cuda.get_device_name(),
              "plain": {"step_ms": graphs.time(PLAIN, batch, ctx)}}
    report["plain"].update(kernel_times(graphs, PLAIN, batch))
    print(json.dumps(report["plain"], indent=1), flush=True)
    for sm in splits:
        part = green.split(runner.device, sm)
        path = pipeline_path(part.memory_sm, part.compute_sm)
        graphs.capture_pipelined(path, batch, pingpong_on(path, part, profiling=True))
        row = {"step_ms": graphs.time(path, batch, ctx)}
        row["stages"] = stage_times(graphs.pipelined[(path, batch)].stage_events)
        row.update(kernel_times(graphs, path, batch))
        report[path.name] = row
        print(path, json.dumps(row, indent=1), flush=True)
        graphs.keep_pipelined(set())
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"decode-step-profile-{shape}-b{batch}-ctx{ctx}.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
