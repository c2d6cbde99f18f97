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
def _gemv_dot(x_ptr, w_ptr, y_ptr, M, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    m = tl.arange(0, 16)
    mmask = m < M
    k0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, 16], tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + k0
        kmask = kk < K
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        xt = tl.load(x_ptr + m[None, :] * K + kk[:, None], mask=mmask[None, :] & kmask[:, None], other=0.0)
        acc = tl.dot(w, xt, acc)
    tl.store(y_ptr + m[None, :] * N + n[:, None], acc.to(y_ptr.dtype.element_ty), mask=mmask[None, :] & nmask[:, None])


def sum_launch(bn, bk, warps, reduce_each):
    def run(x, w, y):
        m, k = x.shape
        n = w.shape[0]
        _gemv_sum[(triton.cdiv(n, bn),)](x, w, y, m, n, k, M_PAD=triton.next_power_of_2(m), BLOCK_N=bn, BLOCK_K=bk,
                                        REDUCE_EACH=reduce_each, num_warps=warps)
    return run


def dot_launch(bn, bk, warps, stages):
    def run(x, w, y):
        m, k = x.shape
        n = w.shape[0]
        _gemv_dot[(triton.cdiv(n, bn),)](x, w, y, m, n, k, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
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
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            j = i % len(ws)
            fn(xs[j], ws[j], ys[j])
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (replays * calls)


def bandwidths() -> dict:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        b.copy_(a)
    start.record()
    for _ in range(20):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    copy = 2 * a.numel() * 20 / (start.elapsed_time(end) / 1e3)
    h = a.view(torch.bfloat16)
    for _ in range(3):
        h.sum(dtype=torch.float32)
    start.record()
    for _ in range(20):
        h.sum(dtype=torch.float32)
    end.record()
    torch.cuda.synchronize()
    read = a.numel() * 20 / (start.elapsed_time(end) / 1e3)
    return {"copy_GBps": copy / 1e9, "read_GBps": read / 1e9}


SHAPES = {  # name: (N, K)
    "8b.qkv": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up": (24576, 4096), "8b.down": (4096, 12288),
    "0.6b.qkv": (4096, 1024), "0.6b.o": (1024, 2048), "0.6b.gate_up": (6144, 1024), "0.6b.down": (1024, 3072),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
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
