"""Compute/memory re-cut (issue 14): each decode stage and its kernels, alone and side by side, on green partitions.

One micro-batch of a model shape (random weights, two layers) at (BATCH, CTX). The pipeline's two stages:
- memory: q/k-norm + rotary + KV write, paged attention (layer 0's `memory`);
- compute: o_proj, post-attention norm, gate/up, SiLU-and-mul, down (layer 0's `compute_post`), then
  input norm and QKV (layer 1's `compute_pre`): what the compute stream runs between two attentions.
Each stage, and each of its kernels on the inputs a real forward hands it, is captured as a CUDA graph of
REPS launches and timed (ms per launch, median of 5 replays):
- all: alone on an ordinary stream (all SMs);
- alone: alone on its own partition (memory work on MEMORY_SMS, compute work on the rest);
- beside: on its own partition while the other partition runs the other stage in a loop.
Per split it sums SM·ms (SMs × ms of both stages, beside vs all) and estimates one pipelined layer (two
micro-batches ping-ponging at the "beside" speeds: max(M0, C1) + max(M1, C0)) against the plain layer (the
whole batch's two stages on all SMs, timed too). It does not time a whole step: `splitserve bench
pipeline` does. With no GPU it only checks that the kernels, in order, compute what the stages do.
Usage: python scripts/probe_recut.py [SHAPE] [BATCH] [CTX] [MEMORY_SMS...]
Env: FIRST_FRACTION (the first micro-batch's share, default 0.5), OUT (writes recut-SHAPE-bBATCH-ctxCTX.json).
"""

import contextlib
import json
import math
import os
import sys

import torch

from splitserve import LLM
from splitserve.bench.shapes import SHAPES
from splitserve.layers.activation import silu_and_mul
from splitserve.layers.attention import AttentionMetadata
from splitserve.models.llama import Handoff
from splitserve.models.loader import cache_dir
from splitserve.pipeline.pingpong import microbatch_bounds
from splitserve.worker.inputs import fake_batch, prepare_inputs

REPS = 10  # launches per graph: a kernel of a few µs still times well above launch noise


def two_layer_shape(name: str) -> str:
    """The shape with two layers: the KV cache of a whole batch fits without wrapping, and start-up is fast."""
    folder = os.path.join(cache_dir(), "shapes", f"{name}-2layers")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(SHAPES[name], num_hidden_layers=2), f, indent=1)
    return folder


def decode_inputs(runner, rows: int, ctx: int):
    """inputs.fake_batch on the device: each sequence on its own KV blocks (the first `rows` of any batch
    get the same blocks, so a micro-batch reads what it would read inside the whole batch)."""
    host = prepare_inputs(fake_batch(rows, ctx, runner.block_size, runner.num_kv_blocks), runner.block_size)
    t = {k: torch.from_numpy(v).to(runner.device) for k, v in host.items()}
    meta = AttentionMetadata(t["slot_mapping"], t["query_start_loc"], t["seq_lens"], t["block_tables"], 1,
                             int(host["seq_lens"].max()), host["query_start_loc"].tolist(), host["seq_lens"].tolist())
    return t["input_ids"], t["positions"], meta


def stage_work(model, ids, positions, meta) -> tuple[dict, dict, dict]:
    """(kernels, stages, check): zero-argument launches on the hand-offs a real forward makes, and the
    largest difference between each stage's output and its kernels' run one after the other, relative to
    the largest value (0 when they agree)."""
    l0, l1 = model.layers
    sa0, sa1 = l0.self_attn, l1.self_attn
    attn = sa0.attn
    q_w, k_w = (sa0.q_norm.weight, sa0.k_norm.weight) if sa0.qk_norm else (None, None)
    eps = sa0.q_norm.eps if sa0.qk_norm else 0.0

    def rope_store(qkv):  # what Attention.forward does first (on CUDA it rotates q in place inside qkv)
        return attn.backend.qk_norm_rope_store(qkv, positions, sa0.rotary.cos_sin, q_w, k_w, eps, attn.k_cache,
                                               attn.v_cache, meta.slot_mapping)

    with torch.no_grad():
        pre = l0.compute_pre(positions, Handoff(None, hidden=model.embed_tokens(ids)), meta)
        qkv = pre.qkv.clone()  # the memory stage changes its input in place: keep the original
        mem = l0.memory(positions, Handoff(pre.residual, qkv=qkv.clone()), meta)
        q = rope_store(qkv.clone())
        attn_out = attn.backend.attend(q, attn.k_cache, attn.v_cache, meta, attn.scale)
        o = sa0.o_proj(mem.attn.flatten(1))
        normed, residual = l0.post_attention_layernorm(o, mem.residual)
        gate_up = l0.mlp.gate_up_proj(normed)
        act = silu_and_mul(gate_up)
        down = l0.mlp.down_proj(act)
        normed1, residual1 = l1.input_layernorm(down, residual)
        qkv1 = sa1.qkv_proj(normed1)
        stage_out = l1.compute_pre(positions, l0.compute_post(positions, mem, meta), meta)
    check = {name: float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
             for name, got, want in [("memory", attn_out, mem.attn), ("compute", qkv1, stage_out.qkv),
                                     ("residual", residual1, stage_out.residual)]}
    kernels = {
        "memory": {"qk_norm_rope_store": lambda: rope_store(qkv),
                   "paged_attention": lambda: attn.backend.attend(q, attn.k_cache, attn.v_cache, meta, attn.scale)},
        "compute": {"o_proj": lambda: sa0.o_proj(mem.attn.flatten(1)),
                    "post_attention_norm": lambda: l0.post_attention_layernorm(o, mem.residual),
                    "gate_up_proj": lambda: l0.mlp.gate_up_proj(normed),
                    "silu_and_mul": lambda: silu_and_mul(gate_up),
                    "down_proj": lambda: l0.mlp.down_proj(act),
                    "input_norm": lambda: l1.input_layernorm(down, residual),
                    "qkv_proj": lambda: sa1.qkv_proj(normed1)}}
    stages = {"memory": lambda: l0.memory(positions, Handoff(pre.residual, qkv=qkv), meta),
              "compute": lambda: l1.compute_pre(positions, l0.compute_post(positions, mem, meta), meta)}
    return kernels, stages, check


@contextlib.contextmanager
def blas_sm_target(sms_left_out: int | None):
    """GEMMs captured inside pick their kernels for the SMs left to them, not the whole device's: torch's
    (experimental) carveout sets cuBLASLt's CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET. A grid sized for 132 SMs
    on a partition of 84 runs in uneven waves."""
    if sms_left_out is None:
        yield
        return
    library, carveout = torch.backends.cuda.preferred_blas_library(), torch._C._get_sm_carveout_experimental()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    torch._C._set_sm_carveout_experimental(sms_left_out)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(carveout)
        torch.backends.cuda.preferred_blas_library(library)


def capture(fn, stream) -> torch.cuda.CUDAGraph:
    with torch.no_grad():
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up on this stream (Triton compiles, cuBLAS picks kernels)
            fn()
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(REPS):
                fn()
    stream.synchronize()
    return graph


def settle(*streams) -> None:
    # torch.cuda.synchronize() alone is not a reliable barrier for green-context streams (GPU-FACTS.md)
    for s in streams:
        if s is not None:
            s.synchronize()
    torch.cuda.synchronize()


def timed(graph, stream, load=None) -> float:
    """ms per launch. `load`: (graph, stream, replays) enqueued on the other partition first, long enough
    to run from before the timed replay starts until after it ends."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        settle(stream, load and load[1])
        if load is not None:
            with torch.cuda.stream(load[1]):
                for _ in range(load[2]):
                    load[0].replay()
        with torch.cuda.stream(stream):
            start.record(stream)
            graph.replay()
            end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) / REPS)
    settle(stream, load and load[1])
    return sorted(times)[len(times) // 2]


def time_fn(fn, stream, load=None) -> float:
    graph = capture(fn, stream)
    t = timed(graph, stream, load)
    del graph  # its private memory pool goes back before the next capture
    return t


def main() -> None:
    from splitserve.pipeline import green

    shape = sys.argv[1] if len(sys.argv) > 1 else "qwen3-8b"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    ctx = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    sms_list = [int(x) for x in sys.argv[4:]] or [24, 32, 40, 48, 64]
    first = float(os.environ.get("FIRST_FRACTION", "0.5"))
    on_gpu = torch.cuda.is_available()
    llm = LLM(two_layer_shape(shape), load_format="dummy", enforce_eager=True, max_num_seqs=batch,
              max_model_len=ctx + 16, enable_prefix_caching=False, gpu_memory_utilization=0.5,
              **({} if on_gpu else {"device": "cpu", "num_kv_blocks": batch * (-(-(ctx + 1) // 16)) + 16}))
    runner = llm.engine.core.runner
    model = runner.model
    with torch.no_grad():
        runner.kv_cache.normal_()
    bounds = microbatch_bounds(batch, (first, 1 - first))
    sizes = [b - a for a, b in bounds]
    # Micro-batch m's rows sit at [a, b) of the batch; timing them as the first rows of their own fake batch
    # reads other blocks than inside the batch, the same amount of them: the KV read is what counts.
    work = {rows: stage_work(model, *decode_inputs(runner, rows, ctx)) for rows in sorted({*sizes, batch})}
    report = {"shape": shape, "batch": batch, "ctx": ctx, "microbatch_rows": sizes, "reps": REPS,
              "check_max_rel_diff": {rows: w[2] for rows, w in work.items()}}
    print(json.dumps(report), flush=True)
    for rows, (_, _, check) in work.items():  # the kernels listed are the stage's, in its order
        # The same kernels on the same inputs: equal, but allow bf16 noise should cuBLAS pick another algorithm.
        assert all(d <= (1e-2 if on_gpu else 0.0) for d in check.values()), (rows, check)
    if not on_gpu:
        print("no GPU: checked the kernel lists against the stages; nothing timed")
        return
    ok, reason = green.capability(runner.device)
    if not ok:
        raise SystemExit(f"probe_recut needs green contexts: {reason}")
    total = torch.cuda.get_device_properties(runner.device).multi_processor_count
    report.update(device=torch.cuda.get_device_name(), total_sms=total)
    everywhere = torch.cuda.Stream()
    rows0 = sizes[0]
    kernels0, stages0, _ = work[rows0]
    all_sms = {"kernels": {kind: {name: time_fn(fn, everywhere) for name, fn in ops.items()}
                           for kind, ops in kernels0.items()},
               "stages": {f"{kind} rows={rows}": time_fn(work[rows][1][kind], everywhere)
                          for rows in work for kind in ("memory", "compute")}}
    report["all_sms"] = all_sms
    print(json.dumps({"all_sms": all_sms}), flush=True)
    plain_layer = all_sms["stages"][f"memory rows={batch}"] + all_sms["stages"][f"compute rows={batch}"]
    report["splits"] = {}
    for sm in sms_list:
        part = green.split(runner.device, sm)
        streams = {"memory": part.memory_stream, "compute": part.compute_stream}
        # The loads: micro-batch 0's other stage in a loop on the other partition.
        loads = {kind: capture(stages0[kind], streams[kind]) for kind in streams}
        load_ms = {kind: timed(g, streams[kind]) * REPS for kind, g in loads.items()}

        def beside(kind: str, ms_alone: float, loads=loads, load_ms=load_ms, streams=streams):
            o = "compute" if kind == "memory" else "memory"  # replays of the other stage covering 3x this one
            return loads[o], streams[o], max(2, math.ceil(3 * ms_alone * REPS / load_ms[o]))

        row = {"memory_sm": part.memory_sm, "compute_sm": part.compute_sm, "kernels": {}, "stages": {}}
        for kind, ops in kernels0.items():
            for name, fn in ops.items():
                alone = time_fn(fn, streams[kind])
                row["kernels"][name] = {"kind": kind, "all": all_sms["kernels"][kind][name], "alone": alone,
                                        "beside": time_fn(fn, streams[kind], beside(kind, alone))}
        for rows in sizes:
            for kind in ("memory", "compute"):
                alone = time_fn(work[rows][1][kind], streams[kind])
                row["stages"][f"{kind} rows={rows}"] = {
                    "all": all_sms["stages"][f"{kind} rows={rows}"], "alone": alone,
                    "beside": time_fn(work[rows][1][kind], streams[kind], beside(kind, alone))}
            stage = row["stages"][f"compute rows={rows}"]
            with blas_sm_target(total - part.compute_sm):  # the compute stage's GEMMs sized for its partition
                stage["alone_blas_sized"] = time_fn(work[rows][1]["compute"], streams["compute"])
                stage["beside_blas_sized"] = time_fn(work[rows][1]["compute"], streams["compute"],
                                                     beside("compute", stage["alone_blas_sized"]))
        st = row["stages"]
        m = [st[f"memory rows={r}"]["beside"] for r in sizes]
        c = [st[f"compute rows={r}"]["beside"] for r in sizes]
        cs = [st[f"compute rows={r}"]["beside_blas_sized"] for r in sizes]

        def layer_ms(m, c):  # two micro-batches ping-ponging: max(M0, C1) + max(M1, C0)
            return max(m[0], c[-1]) + max(m[-1], c[0]) if len(sizes) == 2 else m[0] + c[0]

        pipelined = layer_ms(m, c)
        sm_ms_beside = sum(part.memory_sm * x + part.compute_sm * y for x, y in zip(m, c))
        sm_ms_all = total * sum(st[f"{k} rows={r}"]["all"] for r in sizes for k in ("memory", "compute"))
        row["estimate"] = {"plain_layer_ms": plain_layer, "pipelined_layer_ms": pipelined,
                           "speedup": plain_layer / pipelined,
                           "speedup_blas_sized": plain_layer / layer_ms(m, cs), "sm_ms_beside": sm_ms_beside,
                           "sm_ms_all_sms": sm_ms_all, "sm_ms_ratio": sm_ms_beside / sm_ms_all,
                           "slowdown_beside": {k: {n: v["beside"] / v["alone"] for n, v in row["kernels"].items()
                                                   if v["kind"] == k} for k in ("memory", "compute")}}
        report["splits"][str(part.memory_sm)] = row
        print(json.dumps({str(part.memory_sm): row}), flush=True)
        del loads
        settle(*streams.values())
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"recut-{shape}-b{batch}-ctx{ctx}.json"), "w") as f:
            json.dump(report, f, indent=1)
    print("memory SMs | pipelined ÷ plain layer (est.) | same, GEMMs sized | SM·ms beside ÷ all | memory stage "
          "alone→beside ms | compute stage alone→beside ms | same, GEMMs sized")
    for sm, row in report["splits"].items():
        e, st = row["estimate"], row["stages"]
        mem, comp = st[f"memory rows={rows0}"], st[f"compute rows={rows0}"]
        print(f"{sm} | {e['speedup']:.3f}x | {e['speedup_blas_sized']:.3f}x | {e['sm_ms_ratio']:.3f} | "
              f"{mem['alone']:.3f}→{mem['beside']:.3f} | {comp['alone']:.3f}→{comp['beside']:.3f} | "
              f"{comp['alone_blas_sized']:.3f}→{comp['beside_blas_sized']:.3f}")


if __name__ == "__main__":
    main()
