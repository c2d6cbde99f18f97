"""Where do PD multiplexing's rare long inter-token gaps come from? Drive the Qwen3-8B shape at a Poisson rate
(bench pdmux's requests) with the engine's methods wrapped in timers; print every engine step longer than
--slow-ms with what it did (decode rows, prefill launched / waited for, host time in each part, the split)."""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
from step_watch import GcLog, StackSampler

from splitserve import LLM
from splitserve.bench.pd import drive, make_requests, warm_up
from splitserve.bench.pdmux import arrivals_in_box
from splitserve.bench.shapes import shape_folder
from splitserve.worker import model_runner
from splitserve.worker.decode_graphs import PLAIN


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--rates", type=float, nargs="+", default=[9.0],
                    help="one run per rate, in turn, on the same engine (as bench pdmux does)")
    ap.add_argument("--duration-s", type=float, default=20.0)
    ap.add_argument("--slow-ms", type=float, default=60.0)
    ap.add_argument("--out", default="stalls.json")
    ap.add_argument("--replay-all-graphs", action="store_true",
                    help="replay every captured decode graph once before serving (is a graph's first replay slow?)")
    args = ap.parse_args()
    llm = LLM(shape_folder(args.shape), load_format="dummy", max_model_len=4624, enable_pd_multiplex=True,
              enable_prefix_caching=False)
    engine, core = llm.engine, llm.engine.core
    vocab = engine.model.hf_config.vocab_size
    graphs = core.runner.graphs
    if args.replay_all_graphs:
        for path, bucket in [(PLAIN, b) for b in graphs.plain] + list(graphs.pipelined):
            graphs.time(path, bucket, 1, iters=1)
    warm_up(engine, vocab)
    seen, first_uses = set(), []
    graph_of = graphs._graph

    def noting_graph(path, bucket):
        if (path, bucket) not in seen:
            seen.add((path, bucket))
            first_uses.append(f"{path.name}/{bucket}")
        return graph_of(path, bucket)

    graphs._graph = noting_graph
    parts: dict[str, float] = {}

    def timed(obj, name):
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                parts[name] = parts.get(name, 0.0) + (time.perf_counter() - t0) * 1e3
        setattr(obj, name, wrapper)

    for name in ("_finish_prefill", "_resolve", "_launch", "_admit_compiled"):
        timed(core, name)
    timed(core.runner, "resolve")
    # inside a decode launch (where the 40-75 ms stalls sit that neither an allocator nor a first replay explains)
    runner = core.runner
    for obj, name in ((runner, "_pending_inputs"), (runner, "_sampling_tensors"), (runner, "_to_host"),
                      (runner.model, "compute_logits"), (runner.graphs, "_load"), (runner.graphs, "replay"),
                      (model_runner, "sample"), (model_runner, "prepare_inputs")):
        timed(obj, name)
    timed(core.scheduler, "schedule")
    step = engine.step
    slow, grown, firsts, count, t_start = [], [], [], [0], time.perf_counter()

    gcs = GcLog()  # garbage-collector time so far (a full collection of a torch process walks ~0.5M objects)

    def allocations() -> dict[str, float]:
        """Device and pinned allocator growth so far (cudaMalloc / cudaHostAlloc calls and their time)."""
        dev, host = torch.cuda.memory_stats(), torch.cuda.host_memory_stats()
        return {"device_allocs": dev.get("num_device_alloc", 0), "device_frees": dev.get("num_device_free", 0),
                "host_allocs": host.get("num_host_alloc", 0),
                "host_alloc_ms": host.get("host_alloc_time.total", 0) / 1e3, "gc_ms": gcs.total_ms}

    sampler = StackSampler(args.slow_ms)

    def traced_step():
        parts.clear()
        pending_before = core.prefill_pending is not None
        first_uses.clear()
        before = allocations()
        t0 = time.perf_counter()
        sampler.start_step()
        out = step()
        stacks = sampler.end_step()
        ms = (time.perf_counter() - t0) * 1e3
        count[0] += 1
        grew = {k: v - before[k] for k, v in allocations().items() if v != before[k]}
        if first_uses:
            firsts.append({"t_s": round(t0 - t_start, 3), "step_ms": round(ms, 1), "graphs": list(first_uses)})
        if grew:
            grown.append({"t_s": round(t0 - t_start, 3), "step_ms": round(ms, 1), **grew})
        if ms > args.slow_ms:
            slow.append({
                "t_s": round(t0 - t_start, 3), "step_ms": round(ms, 1),
                "parts_ms": {k: round(v, 1) for k, v in parts.items()}, "prefill_pending_before": pending_before,
                "prefill_pending_after": core.prefill_pending is not None, "running": len(core.scheduler.running),
                "waiting": len(core.scheduler.waiting), "decode_sm": core.lanes.decode_sm,
                "allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 1),
                "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 1), "grew": grew,
                "first_graph_uses": list(first_uses), "stacks": list(stacks)})
            print(json.dumps(slow[-1]), flush=True)
        return out

    engine.step = traced_step
    requests = make_requests(400, (512, 4096), (64, 512), vocab, seed=0)
    t0 = time.perf_counter()
    for rate in args.rates:
        print(f"rate {rate:g} at t = {time.perf_counter() - t_start:.1f} s", flush=True)
        offsets = arrivals_in_box(rate, args.duration_s, seed=1)
        drive(engine, requests[: len(offsets)], offsets, stop_at=args.duration_s)
    result = {"steps": count[0], "slow": slow, "steps_with_allocator_growth_or_gc": grown, "long_gcs": gcs.long,
              "first_graph_uses": firsts,
              "wall_s": time.perf_counter() - t0,
              "pd_multiplex": {k: v for k, v in llm.stats()["pd_multiplex"].items() if k != "plan"},
              "memory_stats": {k: v for k, v in torch.cuda.memory_stats().items() if k.startswith(
                  ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync"))}}
    lists = ("slow", "steps_with_allocator_growth_or_gc", "first_graph_uses")
    print(json.dumps({k: v for k, v in result.items() if k not in lists}), flush=True)
    print(f"steps with allocator growth or a GC: {len(grown)}; steps with a graph's first replay: {len(firsts)} "
          f"(median {sorted(f['step_ms'] for f in firsts)[len(firsts) // 2] if firsts else 0} ms); "
          f"slow steps: {len(slow)}", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
