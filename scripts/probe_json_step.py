"""Where a JSON-constrained decode step's time goes, against plain sampling (issue 19): the engine thread's time
per phase (front end, schedule, prepare, waiting for the mask fill, enqueueing the sampling, launching, waiting
for the step's event, accepting tokens) and the device time of the forward and of the sampling, per step.
Qwen3-0.6B shape, random weights, batch 64 x 256-token prompts. Needs a Qwen tokenizer in .gpu/qwen-tokenizer.
Usage: OUT=dir python3 scripts/probe_json_step.py [--new-tokens 128] [--batch 64] [--shape qwen3-0.6b]"""
import argparse
import collections
import gc
import json
import os
import time

import numpy as np
import torch

from splitserve import LLM
from splitserve.bench.shapes import shape_folder
from splitserve.bench.workloads import SAMPLING_MODES
from splitserve.engine import structured_output

ap = argparse.ArgumentParser()
ap.add_argument("--new-tokens", type=int, default=128)
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--shape", default="qwen3-0.6b")
ap.add_argument("--modes", nargs="+", default=["plain", "json", "plain", "json"])
# variants: "json:sw1e-5" (the switch interval 1e-5 s during fills), "json:eager" (no sampling CUDA graph)

args = ap.parse_args()

folder = shape_folder(args.shape, os.path.abspath(".gpu/qwen-tokenizer"))
llm = LLM(folder, load_format="dummy", gpu_memory_utilization=0.45)
core, tok = llm.engine.core, llm.get_tokenizer()
cuda = core.runner.device.type == "cuda"
wall, calls = collections.defaultdict(float), collections.Counter()
gpu_spans: dict[str, list] = collections.defaultdict(list)


def timed(owner, name, key=None, device_span=False):
    inner, key = getattr(owner, name), key or name

    def wrapper(*a, **k):
        t = time.perf_counter()
        if device_span and cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        try:
            return inner(*a, **k)
        finally:
            wall[key] += time.perf_counter() - t
            calls[key] += 1
            if device_span and cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                gpu_spans[key].append((start, end))
    setattr(owner, name, wrapper)


timed(core, "step", "core.step")
timed(core, "_admit_compiled")
timed(core.scheduler, "schedule")
timed(core.runner, "prepare")
timed(core, "_sample_deferred")
timed(structured_output.BitmaskFill, "result", "fill wait")
timed(structured_output.StructuredOutputManager, "start_fill")
timed(core.runner, "sample", "runner.sample (enqueue)", device_span=True)
timed(core.runner, "launch", "runner.launch (enqueue)", device_span=True)
timed(core.runner, "resolve", "runner.resolve (event wait + tolist)")
timed(core, "_append", "_append (finish checks)")
timed(core, "_resolve_step", "_resolve_step (tokens + _append)")
if core.runner.sampler_graphs is not None:
    timed(core.runner.sampler_graphs, "sample", "sampler_graphs.sample")
    timed(torch.cuda.CUDAGraph, "replay", "CUDAGraph.replay (decode + sampling)")
fill_spans: list[float] = []
_start_fill = structured_output.StructuredOutputManager.start_fill


def start_fill_spanned(self, grammars):
    t0 = time.perf_counter()
    fill = _start_fill(self, grammars)
    done: list[float] = []
    if fill.future is not None:
        fill.future.add_done_callback(lambda _f: done.append(time.perf_counter()))
        fill_spans.append((t0, done))
    return fill


structured_output.StructuredOutputManager.start_fill = start_fill_spanned


sampler_graphs = core.runner.sampler_graphs


def use_variant(variant: str) -> None:
    structured_output.FILL_SWITCH_INTERVAL_S = 1e-5 if "sw1e-5" in variant else 1e-4
    core.runner.sampler_graphs = None if "eager" in variant else sampler_graphs  # "json:eager": no sampling graph
    wide = "t16" in variant  # "json:t16": 16 fill threads of 4 rows each (default: 8 rows per thread, at most 8)
    structured_output.ROWS_PER_FILL_THREAD = 4 if wide else 8
    if core.structured is not None:
        core.structured.fill_threads = 16 if wide else structured_output.default_fill_threads()


rng = np.random.default_rng(0)
prompts = [rng.integers(0, 150000, 256).tolist() for _ in range(args.batch)]
for mode in dict.fromkeys(m.split(":")[0] for m in args.modes):
    llm.generate(prompts, SAMPLING_MODES[mode](8, tok), use_tqdm=False)  # warm up
results = []
for name in args.modes:
    mode, _, variant = name.partition(":")
    use_variant(variant)
    wall.clear(), calls.clear(), gpu_spans.clear(), fill_spans.clear()
    gc0 = [g["collections"] for g in gc.get_stats()]
    t, cpu = time.perf_counter(), time.thread_time()
    llm.generate(prompts, SAMPLING_MODES[mode](args.new_tokens, tok), use_tqdm=False)
    total, cpu = time.perf_counter() - t, time.thread_time() - cpu
    gcs = [g["collections"] - c for g, c in zip(gc.get_stats(), gc0)]
    if cuda:
        torch.cuda.synchronize()
    steps = calls["core.step"]
    spans = [max(done) - t0 for t0, done in fill_spans if done]
    row = {"mode": name, "fill_wall_ms_median": float(np.median(spans) * 1e3) if spans else None, "steps": steps,
           "ms_per_step": total * 1e3 / steps,
           "front_end_ms": (total - wall["core.step"]) * 1e3 / steps,
           "engine_thread_cpu_ms": cpu * 1e3 / steps, "gc_collections_per_generation": gcs,
           "sampler_graphs": sampler_graphs.stats() if sampler_graphs is not None else None,
           "engine_ms": {k: v * 1e3 / steps for k, v in wall.items()}, "calls": dict(calls),
           "device_ms": {k: float(np.median([s.elapsed_time(e) for s, e in v])) for k, v in gpu_spans.items()}}
    results.append(row)
    print(f"=== {name}: {row['ms_per_step']:.3f} ms/step (engine thread CPU {row['engine_thread_cpu_ms']:.3f}), "
          f"front end {row['front_end_ms']:.3f}, fill wall (median) {row['fill_wall_ms_median']} ms, gc {gcs}",
          flush=True)
    for k, v in sorted(row["engine_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:44s} {v:7.3f} ms/step  ({calls[k]} calls)")
    for k, v in row["device_ms"].items():
        print(f"  device: {k:36s} {v:7.3f} ms (median span)")

# The sampler alone on the device (the JSON step's sampling waits on the host, so its device time is serial):
if cuda:
    from splitserve.engine.structured_output import apply_bitmask
    from splitserve.layers.sampler import SamplingTensors, sample

    B, V = args.batch, core.vocab_size
    logits = torch.randn(B, V, device="cuda")
    st = SamplingTensors(torch.ones(B, device="cuda"), torch.zeros(B, dtype=torch.int64, device="cuda"),
                         torch.full((B,), 0.95, device="cuda"), torch.zeros(B, device="cuda"), [None] * B,
                         False, 0, True, False, None)
    mask = torch.randint(-2**31, 2**31 - 1, (B, (V + 31) // 32), dtype=torch.int32, device="cuda")

    def device_ms(fn, n=50):
        fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        s.record()
        for _ in range(n):
            fn()
        e.record()
        host = (time.perf_counter() - t) * 1e3 / n
        torch.cuda.synchronize()
        return {"device_ms": s.elapsed_time(e) / n, "host_enqueue_ms": host}
    def sort_top_p():  # the sampler's top-p before kernels/top_p.py: a sort, a scan and a scatter back
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        cut = sorted_logits.masked_fill(sorted_probs.cumsum(dim=-1) - sorted_probs >= 0.95, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter_(-1, order, cut).softmax(dim=-1)
    alone = {"sample (top_p 0.95)": device_ms(lambda: sample(logits, st)),
             "top-p by sort (previous sampler)": device_ms(sort_top_p),
             "apply_bitmask (xgrammar)": device_ms(lambda: apply_bitmask(logits.clone(), mask, None)),
             "clone only": device_ms(lambda: logits.clone())}
    print(json.dumps(alone, indent=1))
    results.append({"alone": alone})
out = os.environ.get("OUT", ".")
with open(os.path.join(out, "json-step-phases.json"), "w") as f:
    json.dump(results, f, indent=1)
