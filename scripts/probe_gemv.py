"""Can a Triton GEMV beat cuBLAS at decode's small M, and what does a fused prologue cost? (issue 15, P1/P11)

For each weight shape of a model, M in {1, 4}: cuBLAS (F.linear) against Triton GEMV configs, each timed as a
CUDA graph of back-to-back calls cycling over enough weight copies that L2 holds none of them (the way a decode
graph reads each layer's weights once). Prints GB/s of weight bytes; also the copy and read-only bandwidth.
Usage: python scripts/probe_gemv.py OUT_JSON [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import triton
import triton.language as tl

from splitserve.bench.timing import graph_seconds_per_call, median_time
from splitserve.bench.workloads import device_copy_bandwidth


@triton.jit
def _gemv_sum(x_ptr, w_ptr, y_ptr, M, N, K, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              REDUCE_EACH: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    m = tl.arange(0, M_PAD)
    mmask = m < M
    k0 = tl.arange(0, BLOCK_K)
    if REDUCE_EACH:
        acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    else:
        acc3 = tl.zeros([M_PAD, BLOCK_N, BLOCK_K], tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + k0
        kmask = kk < K
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + kk[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        x = tl.load(x_ptr + m[:, None] * K + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        prod = x.to(tl.float32)[:, None, :] * w[None, :, :]
        if REDUCE_EACH:
            acc += tl.sum(prod, axis=2)
        else:
            acc3 += prod
    if not REDUCE_EACH:
        acc = tl.sum(acc3, axis=2)
    tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _gemv_swap(x_ptr, residual_ptr, norm_weight_ptr, w_ptr, y_ptr, residual_out_ptr, eps, M, N, K,
               PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_M: tl.constexpr, RESIDUAL_PREPASS: tl.constexpr):
    """splitserve.kernels.gemv's kernel with the dot's operands swapped: the input's chunk [M, K] is operand A,
    which an MMA takes from registers, so the prologue's result needs no trip through shared memory."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    k0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    sumsq = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    if PROLOGUE == 1 and HAS_RESIDUAL and RESIDUAL_PREPASS:
        if pid == 0:
            for k in range(0, K, BLOCK_K):
                kk = k + k0
                xmask = mmask[:, None] & (kk < K)[None, :]
                xo = m[:, None] * K + kk[None, :]
                s = tl.load(x_ptr + xo, mask=xmask, other=0.0)
                s = (s.to(tl.float32) + tl.load(residual_ptr + xo, mask=xmask, other=0.0).to(tl.float32)).to(s.dtype)
                tl.store(residual_out_ptr + xo, s, mask=xmask)
    for k in range(0, K, BLOCK_K):
        kk = k + k0
        kmask = kk < K
        xmask = mmask[:, None] & kmask[None, :]
        xo = m[:, None] * K + kk[None, :]
        if PROLOGUE == 1:
            s = tl.load(x_ptr + xo, mask=xmask, other=0.0)
            if HAS_RESIDUAL:
                s = (s.to(tl.float32) + tl.load(residual_ptr + xo, mask=xmask, other=0.0).to(tl.float32)).to(s.dtype)
                if not RESIDUAL_PREPASS:
                    if pid == 0:
                        tl.store(residual_out_ptr + xo, s, mask=xmask)
            sf = s.to(tl.float32)
            sumsq += sf * sf
            g = tl.load(norm_weight_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
            xin = (sf * g[None, :]).to(s.dtype)
        elif PROLOGUE == 2:
            gate = tl.load(x_ptr + m[:, None] * 2 * K + kk[None, :], mask=xmask, other=0.0)
            up = tl.load(x_ptr + m[:, None] * 2 * K + K + kk[None, :], mask=xmask, other=0.0)
            gf = gate.to(tl.float32)
            act = (gf / (1.0 + tl.exp(-gf))).to(gate.dtype)
            xin = (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
        else:
            xin = tl.load(x_ptr + xo, mask=xmask, other=0.0)
        w = tl.load(w_ptr + n[None, :].to(tl.int64) * K + kk[:, None], mask=kmask[:, None] & nmask[None, :],
                    other=0.0)
        acc = tl.dot(xin, w, acc)
    if PROLOGUE == 1:
        acc = acc * (1.0 / tl.sqrt(tl.sum(sumsq, axis=1) / K + eps))[:, None]
    tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def swap_launch(prologue, bn, bk, stages, prepass, extra):
    def run(x, w, y):
        m, n, k = x.shape[0], w.shape[0], w.shape[1]
        res, nw, res_out = extra
        _gemv_swap[(triton.cdiv(n, bn),)](x, res, nw, w, y, res_out, 1e-6, m, n, k, PROLOGUE=prologue,
                                         HAS_RESIDUAL=prologue == 1, BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=16,
                                         RESIDUAL_PREPASS=prepass, num_warps=4, num_stages=stages)
    return run


@triton.jit
def _gemv_pdl(x_ptr, w_ptr, y_ptr, M, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
              PREFETCH: tl.constexpr):
    """The plain GEMV; with PDL it lets the next kernel launch at once and waits for the previous one only
    before it reads x, after (with PREFETCH) asking L2 for its first weight chunks, which no kernel writes."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    m = tl.arange(0, 16)
    mmask = m < M
    k0 = tl.arange(0, BLOCK_K)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        if PREFETCH:
            lines = tl.arange(0, 2 * BLOCK_K // 64) * 64  # 128-byte lines of bf16, two chunks deep
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l",
                                      [w_ptr + n[:, None].to(tl.int64) * K + lines[None, :]], dtype=tl.int32,
                                      is_pure=False, pack=1)
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([BLOCK_N, 16], tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + k0
        kmask = kk < K
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        xt = tl.load(x_ptr + m[None, :] * K + kk[:, None], mask=mmask[None, :] & kmask[:, None], other=0.0)
        acc = tl.dot(w, xt, acc)
    tl.store(y_ptr + m[None, :] * N + n[:, None], acc.to(y_ptr.dtype.element_ty), mask=mmask[None, :] & nmask[:, None])


def pdl_chain(out: str) -> None:
    """A Qwen3-8B decode step's projections at batch 1 (qkv, o, gate_up, down) x 36 layers as one CUDA graph, each
    projection's output the next one's input: cuBLAS, the GEMV, the GEMV with programmatic dependent launch
    (PDL), and PDL with an L2 prefetch of the first weight chunks before the wait."""
    from splitserve.kernels.gemv import _tiles

    shapes = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]
    layers = 36
    ws = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for n, k in shapes] for _ in range(layers)]
    xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes]
    ys = [torch.empty(1, n, device="cuda", dtype=torch.bfloat16) for n, _ in shapes]

    def step(kind):
        for lw in ws:
            for i, w in enumerate(lw):
                x, (n, k) = xs[i], w.shape  # one stream: each launch waits for the one before (PDL: at gdc_wait)
                if kind == "cublas":
                    torch.matmul(x, w.t(), out=ys[i])
                    continue
                bn, bk, stages = _tiles(n, k)
                extra = {} if kind == "gemv" else {"launch_pdl": True}
                _gemv_pdl[(triton.cdiv(n, bn),)](x, w, ys[i], 1, n, k, BLOCK_N=bn, BLOCK_K=bk, PDL=kind != "gemv",
                                                 PREFETCH=kind == "pdl_prefetch", num_warps=4, num_stages=stages,
                                                 **extra)

    result = {"device": torch.cuda.get_device_name(), "weight_GB": sum(n * k * 2 for n, k in shapes) * layers / 1e9}
    for kind in ["cublas", "gemv", "pdl", "pdl_prefetch", "gemv", "cublas"]:
        try:
            step(kind)
            torch.cuda.synchronize()
            ms = graph_seconds_per_call(lambda i, kind=kind: step(kind), calls=1, replays=20, warmup=3) * 1e3
            result.setdefault(kind, []).append(ms)
            print(f"{kind}: {ms:.3f} ms per step ({result['weight_GB'] / ms:.2f} TB/s)", flush=True)
        except Exception as e:
            result.setdefault(kind, []).append(str(e).splitlines()[0][:300])
            print(kind, "failed:", str(e).splitlines()[0][:300], flush=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


def sum_launch(bn, bk, warps, reduce_each):
    def run(x, w, y):
        m, k = x.shape
        n = w.shape[0]
        _gemv_sum[(triton.cdiv(n, bn),)](x, w, y, m, n, k, M_PAD=triton.next_power_of_2(m), BLOCK_N=bn, BLOCK_K=bk,
                                        REDUCE_EACH=reduce_each, num_warps=warps)
    return run


def dot_launch(bn, bk, warps, stages):
    """splitserve's GEMV kernel with the given tiles (the grid of probe-gemv.json ran an equal copy of its loop)."""
    from splitserve.kernels.gemv import MAX_ROWS, _gemv_kernel

    def run(x, w, y):
        m, k = x.shape
        n = w.shape[0]
        _gemv_kernel[(triton.cdiv(n, bn),)](x, w, w, y, m, n, k, x.stride(0), HAS_BIAS=False, SILU_MUL=False,
                                           BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=MAX_ROWS, num_warps=warps,
                                           num_stages=stages)
    return run


def cublas(x, w, y):
    torch.matmul(x, w.t(), out=y)


def time_graph(fn, xs, ws, ys, calls: int = 48, replays: int = 10) -> float:
    """Seconds per call, over a graph of `calls` calls cycling through the weight copies."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(len(ws)):  # compile / warm up outside the capture
            fn(xs[i], ws[i], ys[i])
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    return graph_seconds_per_call(lambda i: fn(xs[i % len(ws)], ws[i % len(ws)], ys[i % len(ws)]), calls, replays,
                                  warmup=3)


def bandwidths() -> dict:
    """The copy bandwidth (bytes read + written) and the read-only one (a bf16 sum) of 1 GiB."""
    h = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    read = h.numel() * 2 / median_time(lambda: h.sum(dtype=torch.float32), h.device, iters=20, warmup=3)
    return {"copy_GBps": device_copy_bandwidth(h.device) / 1e9, "read_GBps": read / 1e9}


SHAPES = {  # name: (N, K)
    "8b.qkv": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up": (24576, 4096), "8b.down": (4096, 12288),
    "0.6b.qkv": (4096, 1024), "0.6b.o": (1024, 2048), "0.6b.gate_up": (6144, 1024), "0.6b.down": (1024, 3072),
}


PROLOGUE_SHAPES = {  # name: (N, K, prologue): 1 = RMSNorm + residual, 2 = SiLU-and-mul, 0 = none
    "8b.qkv": (6144, 4096, 1), "8b.o": (4096, 4096, 0), "8b.gate_up": (24576, 4096, 1), "8b.down": (4096, 12288, 2),
    "0.6b.qkv": (4096, 1024, 1), "0.6b.o": (1024, 2048, 0), "0.6b.gate_up": (6144, 1024, 1),
    "0.6b.down": (1024, 3072, 2),
}


def prologues(out: str) -> None:
    """The fused input ops' cost: an operand-swapped GEMV plain and with the op, against cuBLAS, per decoder
    shape. The rows `ours_*` of probe-gemv-prologues.json came from splitserve's own GEMV with the op fused in
    front, at commit 521281b (`ours_op_*`: the options it tried: the residual written in a pass of its own, the
    sum of squares reduced once at the end); it was 2-4x slower than without the op and was dropped."""
    result = {"device": torch.cuda.get_device_name(), "shapes": {}}
    for (name, (n, k, prologue)), m in itertools.product(PROLOGUE_SHAPES.items(), [1, 4]):
        nbytes = n * k * 2
        copies = max(2, math.ceil(240e6 / nbytes))
        kx = 2 * k if prologue == 2 else k
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        xs = [torch.randn(m, kx, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        ys = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        extra = (torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.rand(k, device="cuda").bfloat16() + 0.5,
                 torch.empty(m, k, device="cuda", dtype=torch.bfloat16))
        plain_x = [x[:, :k].contiguous() for x in xs]
        fns = {"cublas": (cublas, plain_x)}
        for bn, bk, stages in [(64, 128, 5), (32, 256, 5), (64, 128, 3), (128, 128, 3), (32, 128, 5), (128, 64, 4)]:
            fns[f"swap_plain{bn}x{bk}s{stages}"] = (swap_launch(0, bn, bk, stages, False, extra), plain_x)
            fns[f"swap_op{bn}x{bk}s{stages}"] = (swap_launch(prologue, bn, bk, stages, True, extra), xs)
            if prologue == 1:
                fns[f"swap_op_inloop{bn}x{bk}s{stages}"] = (swap_launch(prologue, bn, bk, stages, False, extra), xs)
        row = {}
        for fname, (fn, xin) in fns.items():
            try:
                row[fname] = {"us": time_graph(fn, xin, ws, ys) * 1e6}
            except Exception as e:
                row[fname] = {"error": str(e).splitlines()[0][:200]}
        ok = {f: v["us"] for f, v in row.items() if "us" in v}
        best_swap_op = min((u, f) for f, u in ok.items() if f.startswith("swap_op"))
        best_swap_plain = min((u, f) for f, u in ok.items() if f.startswith("swap_plain"))
        print(f"{name} M={m}: cublas {ok['cublas']:.2f}" +
              f" | swap plain {best_swap_plain[1]} {best_swap_plain[0]:.2f} | swap op {best_swap_op[1]} "
              f"{best_swap_op[0]:.2f}", flush=True)
        result["shapes"][f"{name}.m{m}"] = {"N": n, "K": k, "M": m, "prologue": prologue, "fns": row}
        del ws, xs, ys
        torch.cuda.empty_cache()
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prologues", action="store_true", help="the fused input ops' cost (see prologues())")
    ap.add_argument("--pdl", action="store_true", help="programmatic dependent launch in a chain (pdl_chain())")
    args = ap.parse_args()
    if args.prologues:
        return prologues(args.out)
    if args.pdl:
        return pdl_chain(args.out)
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              **bandwidths(), "shapes": {}}
    print(f"copy {result['copy_GBps']:.0f} GB/s, read {result['read_GBps']:.0f} GB/s", flush=True)
    configs = {"cublas": cublas}
    for bn, bk, warps in itertools.product([4, 8, 16, 32], [256, 512, 1024], [2, 4, 8]):
        if bn * bk <= 16384:
            configs[f"sum{bn}x{bk}w{warps}"] = sum_launch(bn, bk, warps, False)
            if bn * bk <= 8192:
                configs[f"sumr{bn}x{bk}w{warps}"] = sum_launch(bn, bk, warps, True)
    for bn, bk, warps, stages in itertools.product([16, 32, 64, 128], [64, 128, 256], [4], [3, 5]):
        configs[f"dot{bn}x{bk}w{warps}s{stages}"] = dot_launch(bn, bk, warps, stages)
    if args.quick:
        configs = dict(list(configs.items())[:6])
    for (name, (n, k)), m in itertools.product(SHAPES.items(), [1, 4]):
        nbytes = n * k * 2
        copies = max(2, math.ceil(240e6 / nbytes))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        ys = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        ref = (xs[0].float() @ ws[0].float().t())
        row = {}
        for cname, fn in configs.items():
            try:
                fn(xs[0], ws[0], ys[0])
                err = ((ys[0].float() - ref).abs().max() / ref.abs().max()).item()
                if err > 2e-2:
                    row[cname] = {"error": f"max rel err {err:.3g}"}
                    continue
                sec = time_graph(fn, xs, ws, ys)
                row[cname] = {"us": sec * 1e6, "GBps": nbytes / sec / 1e9}
            except Exception as e:  # a config that does not compile or fit is a result too
                row[cname] = {"error": str(e).splitlines()[0][:200]}
        best = sorted(((v["us"], c) for c, v in row.items() if "us" in v))[:5]
        print(f"{name} M={m}: cublas {row['cublas'].get('us', float('nan')):.2f} us "
              f"({row['cublas'].get('GBps', 0):.0f} GB/s); best " +
              ", ".join(f"{c} {u:.2f} us ({nbytes / u / 1e3:.0f} GB/s)" for u, c in best), flush=True)
        result["shapes"][f"{name}.m{m}"] = {"N": n, "K": k, "M": m, "configs": row}
        del ws, xs, ys
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
