"""Issue 15's launch cuts, A/B in one process: decode step time with each switch on and off.

One engine per shape (random weights, `bench latency`'s set-up); for each variant the decode graphs are
captured afresh and `bench.workloads.latency` (and, with --smallbatch, `workloads.smallbatch`) runs on
them. Variants: cublas (the projections as cuBLAS GEMMs, the split-K chunk at least 256 keys: the code before
2026-12-01), gemv (decode's projections as the Triton GEMV: splitserve.layers.linear), gemv_split64 (and chunks
down to 64 keys: the code now), and cublas again last (the drift of the run); q/k-norm + rotary + KV store are
one kernel in all. (The results of 2026-12-01 name a fourth, gemv_unfused: this gemv; their gemv had the
norm / SiLU fused in front, commit 521281b, and was dropped.) With --split-min-keys
K ...: instead, the default layout with each K as the decode attention's shortest split-K chunk
(`SPLIT_MIN_KEYS`, fixed in a graph at capture), then the first K again. Each variant also counts the
kernels one graph replay launches, per point.
Usage: python scripts/gpu_fused_ab.py SHAPE OUT_JSON --points B:CTX ... [--smallbatch] [--split-min-keys K ...]
"""

from __future__ import annotations

import argparse
import gc
import json

import torch
from torch.profiler import ProfilerActivity, profile

from splitserve import LLM
from splitserve.bench import workloads
from splitserve.bench.shapes import shape_folder
from splitserve.kernels import paged_attention
from splitserve.layers import linear
from splitserve.worker.decode_graphs import PLAIN, DecodeGraphs

# name -> the GEMV's row limit (the fused q/k-norm kernel was A/B'd on 2026-11-30 and is on in all of them)
VARIANTS = [("cublas", True, 0, 256), ("gemv", True, linear.GEMV_ROWS, 256),
            ("gemv_split64", True, linear.GEMV_ROWS, 64), ("cublas_again", True, 0, 256)]


def recapture(llm, fuse_qkv: bool, gemv_rows: int = linear.GEMV_ROWS,
              split_min_keys: int = paged_attention.SPLIT_MIN_KEYS) -> None:
    runner = llm.engine.core.runner
    paged_attention.SPLIT_MIN_KEYS = split_min_keys  # read by decode_splits when each graph is captured
    linear.gemv_rows = gemv_rows  # read by each projection as the graph is captured
    runner.graphs = None  # free the old graphs' pool before capturing the new ones
    gc.collect()
    torch.cuda.empty_cache()
    runner.model.layers[0].self_attn.attn.backend.fuse_qkv = fuse_qkv  # one backend object for all layers
    cfg = runner.config
    runner.graphs = DecodeGraphs(runner.model, runner.device, cfg.max_num_seqs, runner.max_model_len,
                                 runner.block_size, runner.num_kv_blocks)


def kernels_per_replay(llm, batch: int, ctx: int) -> int:
    graphs = llm.engine.core.runner.graphs
    graphs.time(PLAIN, graphs.bucket_for(batch), ctx, iters=1)  # loads a fake batch of this context
    graph = graphs._graph(PLAIN, graphs.bucket_for(batch)).graph
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape")
    ap.add_argument("out")
    ap.add_argument("--points", nargs="+", required=True, help="BATCH:CTX")
    ap.add_argument("--smallbatch", action="store_true", help="also the 4 x 64 small-batch workload (P2)")
    ap.add_argument("--split-min-keys", type=int, nargs="+", default=None)
    args = ap.parse_args()
    variants = VARIANTS
    if args.split_min_keys:
        keys = args.split_min_keys + args.split_min_keys[:1]
        variants = [(f"{'keys' if i < len(keys) - 1 else 'again'}{k}", True, linear.GEMV_ROWS, k)
                    for i, k in enumerate(keys)]
    points = [tuple(map(int, p.split(":"))) for p in args.points]
    batches, ctxs = sorted({b for b, _ in points}), sorted({c for _, c in points})
    llm = LLM(shape_folder(args.shape), load_format="dummy", max_num_seqs=max(batches),
              max_model_len=max(ctxs) + 1)
    runner = llm.engine.core.runner
    result = {"shape": args.shape, "device": torch.cuda.get_device_name(runner.device), "torch": torch.__version__,
              "max_model_len": runner.max_model_len, "variants": {}}
    for name, fuse_qkv, *rest in variants:
        recapture(llm, fuse_qkv, *rest)
        graphs = runner.graphs
        wanted, bandwidth = [], None
        for b, c in points:  # one point a call: the grid would also run every (batch, ctx) cross pair
            lat = workloads.latency(llm, [b], [c])
            p = lat["points"][0]
            if "skipped" not in p:
                p["kernels_per_replay"] = kernels_per_replay(llm, b, c)
            wanted.append(p)
            bandwidth = bandwidth or lat["copy_bandwidth_GBps"]
        entry = {"fuse_qkv": fuse_qkv, "gemv_rows": linear.gemv_rows, "split_min_keys": paged_attention.SPLIT_MIN_KEYS,
                 "copy_bandwidth_GBps": bandwidth, "graph_capture_s": graphs.capture_time_s, "points": wanted}
        if args.smallbatch:
            entry["smallbatch"] = workloads.smallbatch(llm)
        result["variants"][name] = entry
        print(name, json.dumps([{k: p.get(k) for k in ("batch", "ctx", "ms_per_step", "graph_gpu_ms",
                                                       "kernels_per_replay")} for p in wanted]),
              entry.get("smallbatch", {}).get("decode_tok_s", ""), flush=True)
        with open(args.out, "w") as f:  # after every variant: a timeout keeps what was measured
            json.dump(result, f, indent=1)
    first = variants[0][0]
    base = result["variants"][first]["points"]
    print(f"\n{args.shape}: graph GPU ms (wall ms) per decode step, ratio to '{first}'")
    for i, p in enumerate(base):
        if "skipped" in p:
            print(f"  b{p['batch']} ctx{p['ctx']}: {p['skipped']}")
            continue
        row = []
        for name, v in result["variants"].items():
            q = v["points"][i]
            row.append(f"{name} {q['graph_gpu_ms']:.3f} ({q['ms_per_step']:.3f}) "
                       f"x{q['graph_gpu_ms'] / p['graph_gpu_ms']:.3f} k={q['kernels_per_replay']}")
        print(f"  b{p['batch']} ctx{p['ctx']}: " + " | ".join(row))
    if args.smallbatch:
        print("  smallbatch tok/s: " + " | ".join(f"{n} {v['smallbatch']['decode_tok_s']:.0f}"
                                                  for n, v in result["variants"].items()))


if __name__ == "__main__":
    main()
