"""`splitserve bench pipeline`: plain decode graph vs the pipelined graph of each variant vs the planner.

A pipelined variant is an SM split (memory | compute partition) and a cut of the batch into two
micro-batches (`--microbatch-fractions`: the first one's share; 0.5 is two equal halves).
Per model shape (random weights), over a (batch, context) grid:
- every path's decode step, timed as graph replays (`DecodeGraphs.time`);
- points whose fake block tables wrap around the KV cache (sequences share blocks, so L2 hits can beat
  the HBM roofline) are marked and left out of the goals;
- the planner's choice, from its own calibration (anchors = the grid's batches, contexts 256/1024/4096,
  fewer replays), judged against the separately measured grid — contexts 512 and 2048 are interpolated
  by the planner, so P6 tests the interpolation too;
- the roofline: serial (each kernel at its own bound, what a one-stream step can reach) and overlapped
  (all FLOPs at the GEMM peak while all bytes move at the copy bandwidth, what no split can beat);
- M3: one run whose context grows step by step; adaptive split (planner with hysteresis) vs each fixed path.
"""

from __future__ import annotations

import gc
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from splitserve.pipeline.planner import DecodePlanner, calibrate, candidate_splits, pingpong_on
from splitserve.pipeline.profiling import stage_times
from splitserve.worker.decode_graphs import PLAIN as PLAIN_PATH
from splitserve.worker.decode_graphs import DecodePath, pipeline_path

PLAIN = PLAIN_PATH.name  # results are keyed by path name


def gemm_tflops(device: torch.device, n: int = 8192) -> float:
    """Measured bf16 GEMM throughput (FLOP/s) on the whole GPU: the compute ceiling of this run."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / float(np.median(times))


def roofline_ms(cfg, batch: int, ctx: int, flops_per_s: float, bytes_per_s: float, itemsize: int = 2) -> dict:
    """Decode-step lower bounds for a Llama/Qwen layer stack (lm_head is outside the decode graph)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q, kv, h, inter = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim, cfg.hidden_size, \
        cfg.intermediate_size
    layers = cfg.num_hidden_layers
    gemms = [h * (q + 2 * kv), q * h, h * 2 * inter, inter * h]  # weights of QKV, O, gate/up, down
    kv_bytes = batch * ctx * 2 * kv * itemsize
    attn_flops = 4 * batch * ctx * q
    serial = sum(max(2 * batch * w / flops_per_s, w * itemsize / bytes_per_s) for w in gemms)
    serial += max(attn_flops / flops_per_s, kv_bytes / bytes_per_s)
    total_flops = 2 * batch * sum(gemms) + attn_flops
    total_bytes = sum(gemms) * itemsize + kv_bytes
    overlap = max(total_flops / flops_per_s, total_bytes / bytes_per_s)
    return {"roofline_serial_ms": serial * layers * 1e3, "roofline_overlap_ms": overlap * layers * 1e3}


def _measure(graphs, paths: list[DecodePath], batch: int, ctx: int, iters: int) -> dict[str, float]:
    return {p.name: graphs.time(p, batch, ctx, iters) for p in paths}


def _stages(graphs, path: DecodePath, batch: int) -> dict | None:
    """Busy time of the memory and compute streams and overlap efficiency in the last replay of a pipelined
    graph (its stage events are event-record nodes inside the graph)."""
    graph = graphs.pipelined.get((path, batch))
    return stage_times(graph.stage_events) if graph is not None and graph.stage_events else None


def wraps(batch: int, ctx: int, block_size: int, num_kv_blocks: int) -> bool:
    """Whether inputs.fake_batch's tables for (batch, ctx) wrap around the cache (sequences share blocks)."""
    return batch * -(-(ctx + 1) // block_size) > num_kv_blocks


def bench_shape(shape: str, batches: list[int], ctxs: list[int], splits: list[int] | None,
                fractions: list[float], iters: int, m3_batch: int | None, m3_step: int, kwargs: dict) -> dict:
    from splitserve import LLM
    from splitserve.bench.shapes import shape_folder
    from splitserve.bench.workloads import device_copy_bandwidth
    from splitserve.pipeline import green
    from splitserve.worker.model_runner import resolve_device

    device = resolve_device(kwargs.get("device", "auto"))
    ok, reason = green.capability(device)
    if not ok:
        raise RuntimeError(f"bench pipeline needs green contexts: {reason}")
    bandwidth = device_copy_bandwidth(device)  # the ceilings first, while the GPU is empty
    flops = gemm_tflops(device)
    torch.cuda.empty_cache()
    # Room beside the KV cache for the plain graphs of every bucket and the grid of pipelined graphs.
    # Profiling puts stage timing events into the pipelined graphs (event-record nodes: a few µs a step).
    engine_args = {"load_format": "dummy", "max_num_seqs": max(batches), "max_model_len": max(ctxs) + 16,
                   "enable_prefix_caching": False, "gpu_memory_utilization": 0.8,
                   "decode_pipeline_profiling": True, **kwargs}
    llm = LLM(shape_folder(shape), **engine_args)
    runner = llm.engine.core.runner
    graphs = runner.graphs
    if graphs is None:
        raise RuntimeError("bench pipeline needs CUDA graphs (enforce_eager is set)")
    runner.kv_cache.normal_()  # finite values in every block the wrapped tables read
    missing = [b for b in batches if b not in graphs.buckets]
    if missing:
        raise ValueError(f"batch sizes {missing} are not decode graph buckets {graphs.buckets}")
    total_sms = torch.cuda.get_device_properties(device).multi_processor_count
    partitions = {}  # every variant's path -> its split (variants of one split share the partition)
    for sm in splits or candidate_splits(total_sms):
        part = green.split(device, sm)
        for fraction in fractions:
            partitions[pipeline_path(part.memory_sm, part.compute_sm, fraction)] = part
    paths = [PLAIN_PATH, *partitions]

    # The grid of pipelined graphs (every variant at every batch), with its capture time and memory.
    mem0 = graphs.free_memory()
    t0 = time.perf_counter()
    for b in batches:
        for path, part in partitions.items():
            graphs.capture_pipelined(path, b, pingpong_on(path, part, profiling=True))
    grid_graphs = {"count": len(graphs.pipelined), "capture_s": time.perf_counter() - t0,
                   "memory_bytes": mem0 - graphs.free_memory()}

    # The planner's own calibration, as the engine runs it (it reuses the graphs captured above).
    plan_ctx = sorted({min(c, max(ctxs)) for c in (256, 1024, 4096)})
    plan = calibrate(graphs, partitions, batches, plan_ctx, iters=3)

    points = []
    for b, c in tqdm([(b, c) for b in batches for c in ctxs], desc=f"pipeline {shape}", unit="point"):
        times = _measure(graphs, paths, b, c, iters)
        stages = {p.name: _stages(graphs, p, b) for p in paths[1:]}  # each path's last replay was at (b, c)
        best = min(times, key=times.get)
        best_pipe = min((p.name for p in paths[1:]), key=times.get)
        chosen = DecodePlanner(plan).choose(b, b, c)[0].name  # a fresh planner: no hysteresis history
        points.append({"batch": b, "ctx": c, "ms": times, "best": best, "planner": chosen, "stages": stages,
                       "best_pipeline": best_pipe,
                       "wraps": wraps(b, c, graphs.block_size, runner.num_kv_blocks),
                       "speedup_best_vs_plain": times[PLAIN] / times[best],
                       "planner_over_best": times[chosen] / times[best],
                       **roofline_ms(runner.hf_config, b, c, flops, bandwidth)})

    result = {"shape": shape, "batches": batches, "ctxs": ctxs, "splits": {p.name: [s.memory_sm, s.compute_sm]
                                                                          for p, s in partitions.items()},
              "microbatch_fractions": fractions,
              "graph_grid": grid_graphs, "plan": plan.to_json(), "plan_table": plan.table(),
              "copy_bandwidth_GBps": bandwidth / 1e9, "gemm_TFLOPs": flops / 1e12, "points": points,
              "num_kv_blocks": runner.num_kv_blocks}
    if m3_batch:
        result["m3"] = growing_context_run(graphs, plan, paths, m3_batch, max(256, min(ctxs)), max(ctxs), m3_step)
    del llm, runner, graphs, partitions
    gc.collect()  # the graphs and the KV cache go before the next shape's engine is built
    torch.cuda.empty_cache()
    return result


def growing_context_run(graphs, plan, paths: list[DecodePath], batch: int, ctx_from: int, ctx_to: int,
                        step: int, iters: int = 3) -> dict:
    """M3: a batch whose context grows from ctx_from to ctx_to. Every path is timed at every step; the
    adaptive run pays the time of the path the planner picked at that step (hysteresis on), a fixed run
    the time of its one path."""
    planner = DecodePlanner(plan)
    totals = dict.fromkeys((p.name for p in paths), 0.0)
    adaptive, trace = 0.0, []
    for ctx in tqdm(range(ctx_from, ctx_to + 1, step), desc="M3 growing context", unit="step"):
        times = _measure(graphs, paths, batch, ctx, iters)
        chosen = planner.choose(batch, batch, ctx)[0].name
        adaptive += times[chosen]
        for p in totals:
            totals[p] += times[p]
        trace.append({"ctx": ctx, "chosen": chosen, "ms": times,
                      "wraps": wraps(batch, ctx, graphs.block_size, graphs.num_kv_blocks)})
    best_fixed = min(totals, key=totals.get)
    return {"batch": batch, "ctx_from": ctx_from, "ctx_to": ctx_to, "step": step, "adaptive_ms": adaptive,
            "fixed_ms": totals, "best_fixed": best_fixed, "best_fixed_over_adaptive": totals[best_fixed] / adaptive,
            "switches": planner.num_switches, "trace": trace}


def pipeline_bench(args, kwargs: dict) -> dict:
    shapes = args.shapes or ["qwen3-8b", "qwen3-0.6b"]
    out = {"workload": "pipeline", "shapes": {}}
    for shape in shapes:
        out["shapes"][shape] = bench_shape(shape, args.batch_sizes, args.context_lens, args.splits,
                                           args.microbatch_fractions, args.iters,
                                           args.m3_batch if shape == shapes[0] else None, args.m3_step, kwargs)
    out["goals"] = goals(out)
    return out


P5_SPEEDUP, P5_MIN_BATCH = 1.15, 512  # issue 14: the best pipelined variant, 8B, batch >= 512
P6_MARGIN = 1.03
M3_GAIN = 1.03


def goals(r: dict) -> dict:
    """Issue 14's goals, over the points whose tables do not wrap:
    P5: the best pipelined variant >= 1.15x plain at the point where it does best (Qwen3-8B, batch >= 512);
    P6: the planner's choice <= 1.03x the fastest path at every point;
    M3: the growing-context run, adaptive >= 1.03x the best fixed path with at least one switch."""
    g = {}
    big = r["shapes"].get("qwen3-8b")
    if big:
        candidates = [p for p in big["points"] if p["batch"] >= P5_MIN_BATCH and not p.get("wraps")]
        best = max(candidates, key=lambda p: p["ms"][PLAIN] / p["ms"][p["best_pipeline"]], default=None)
        if best:
            speedup = best["ms"][PLAIN] / best["ms"][best["best_pipeline"]]
            g["P5"] = {"goal": f">= {P5_SPEEDUP:.2f} (8B, batch >= {P5_MIN_BATCH}, best point)", "value": speedup,
                       "met": speedup >= P5_SPEEDUP,
                       "at": f"{best['best_pipeline']}, batch {best['batch']}, ctx {best['ctx']}"}
    measured = [(shape, p) for shape, s in r["shapes"].items() for p in s["points"] if not p.get("wraps")]
    if measured:
        shape, worst = max(measured, key=lambda sp: sp[1]["planner_over_best"])
        g["P6"] = {"goal": f"<= {P6_MARGIN} at every point", "value": worst["planner_over_best"],
                   "met": worst["planner_over_best"] <= P6_MARGIN,
                   "at": f"worst: {shape}, batch {worst['batch']}, ctx {worst['ctx']}"}
    m3 = next((s["m3"] for s in r["shapes"].values() if "m3" in s), None)
    if m3:
        gain = m3["best_fixed_over_adaptive"]
        g["M3"] = {"goal": f"adaptive >= {M3_GAIN}x the best fixed path, >= 1 switch", "value": gain,
                   "met": gain >= M3_GAIN and m3["switches"] >= 1,
                   "at": f"{m3['switches']} switches; best fixed {m3['best_fixed']}"}
    return g


def markdown(r: dict) -> str:
    lines = [f"# pipeline — {r.get('device')} (torch {r.get('torch')}, {r.get('date')})\n\n"]
    for name, goal in r.get("goals", {}).items():
        value = f"{goal['value']:.3f}" if goal["value"] is not None else "n/a"
        lines.append(f"- **{name}** {goal['goal']}: {value} ({goal.get('at', '')}) — "
                     f"{'met' if goal['met'] else 'missed'}\n")
    for shape, s in r["shapes"].items():
        splits = ", ".join(f"{p} = {a}|{f} SMs" for p, (a, f) in s["splits"].items())
        grid = s["graph_grid"]
        lines += [f"\n## {shape}\n\nVariants (memory|compute SMs; `:f`: the first micro-batch's share, "
                  f"else halves): {splits}. Points marked † have fake block tables that wrap around the KV "
                  "cache, and are left out of the goals. "
                  f"Copy bandwidth {s['copy_bandwidth_GBps']:.0f} GB/s, GEMM {s['gemm_TFLOPs']:.0f} TFLOP/s "
                  "(measured in this run). Pipelined graph grid: "
                  f"{grid['count']} graphs, {grid['capture_s']:.1f} s to capture, "
                  f"{grid['memory_bytes'] / 2**30:.2f} GiB.\n\n"]
        paths = list(s["splits"])
        lines.append("| batch | ctx | plain ms | " + " | ".join(f"{p} ms" for p in paths) +
                     " | best | best ÷ plain speed-up | planner | planner ÷ best | roofline serial ms | "
                     "roofline overlap ms | fastest variant: memory / compute busy ms, overlap |\n")
        lines.append("|" + "---|" * (10 + len(paths)) + "\n")
        for p in s["points"]:
            cells = " | ".join(f"{p['ms'][q]:.3f}" for q in paths)
            st = (p.get("stages") or {}).get(p.get("best_pipeline"))
            stage = (f"{p['best_pipeline']}: {st['memory_ms']:.1f} / {st['compute_ms']:.1f}, "
                     f"{st['overlap_efficiency']:.2f}" if st else "-")
            mark = " †" if p.get("wraps") else ""
            lines.append(f"| {p['batch']} | {p['ctx']}{mark} | {p['ms'][PLAIN]:.3f} | {cells} | {p['best']} | "
                         f"{p['speedup_best_vs_plain']:.2f}× | {p['planner']} | {p['planner_over_best']:.3f} | "
                         f"{p['roofline_serial_ms']:.2f} | {p['roofline_overlap_ms']:.2f} | {stage} |\n")
        lines.append(f"\nThe planner's calibrated plan (calibration {s['plan']['calibration_s']:.1f} s):\n\n```\n"
                     f"{s['plan_table']}\n```\n")
        if "m3" in s:
            m = s["m3"]
            fixed = ", ".join(f"{p} {t:.0f} ms" for p, t in m["fixed_ms"].items())
            lines.append(f"\nM3, batch {m['batch']}, context {m['ctx_from']} → {m['ctx_to']} in steps of {m['step']}: "
                         f"adaptive {m['adaptive_ms']:.0f} ms ({m['switches']} switches); fixed: {fixed}; "
                         f"best fixed ÷ adaptive = {m['best_fixed_over_adaptive']:.3f}.\n")
    return "".join(lines)


def plot(r: dict, path: str, plt) -> None:
    """Heatmap per shape: best pipelined step time ÷ plain (speed-up > 1 = pipeline wins); cells marked
    with the planner's choice."""
    shapes = list(r["shapes"].items())
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4.8), squeeze=False)
    for ax, (shape, s) in zip(axes[0], shapes):
        batches, ctxs = s["batches"], s["ctxs"]
        grid = np.full((len(batches), len(ctxs)), np.nan)
        for p in s["points"]:
            pipe = min(t for q, t in p["ms"].items() if q != PLAIN)
            grid[batches.index(p["batch"]), ctxs.index(p["ctx"])] = p["ms"][PLAIN] / pipe
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.6, vmax=1.4, origin="lower", aspect="auto")
        for p in s["points"]:
            i, j = batches.index(p["batch"]), ctxs.index(p["ctx"])
            mark = ("P" if p["planner"] != PLAIN else "p") + (" †" if p.get("wraps") else "")
            ax.text(j, i, f"{grid[i, j]:.2f}\n{mark}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(ctxs)), ctxs)
        ax.set_yticks(range(len(batches)), batches)
        ax.set_xlabel("context length")
        ax.set_ylabel("batch")
        ax.set_title(f"{shape}: best pipelined speed-up over plain\n(P/p: planner picks pipeline/plain; "
                     "†: tables wrap)", fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"decode pipeline on {r.get('device')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
