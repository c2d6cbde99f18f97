"""Decode's projections at M ≤ 16 rows: one Triton GEMV with its input's elementwise op fused in front.

At decode's small batch a projection reads its whole weight to produce a few rows, so it is bound by HBM; cuBLAS
reads these shapes at 60–93% of what this kernel does on an H200 (scripts/probe_gemv.py, e.g. Qwen3-8B's
o_proj 13.3 → 11.2 µs, down_proj 30.3 → 26.1 µs, Qwen3-0.6B's o_proj 13.1 → 5.3 µs). The weight tiles stream
through a software pipeline (`tl.dot` on the rows padded to 16, which costs nothing at this intensity), and the
input's op runs on each K-chunk as it is loaded, so it needs no launch of its own:
- RMSNorm (with the residual add): the chunk is `s = x + residual` (rounded as torch rounds it), and the program
  sums `s²` as it goes; the norm's 1/rms is a per-row scale, so it multiplies the accumulator once at the end.
  The first program writes `s`, the new residual stream, to a separate buffer (others are still reading it).
- SiLU-and-mul: the chunk is `silu(gate) * up`, with torch's roundings.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # the rows one tile holds; more rows than this go to cuBLAS
_PLAIN, _NORM, _SILU_MUL = 0, 1, 2


@triton.jit
def _gemv_kernel(x_ptr, residual_ptr, norm_weight_ptr, w_ptr, bias_ptr, y_ptr, residual_out_ptr, eps, M, N, K,
                 stride_xm, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                 RESIDUAL_PREPASS: tl.constexpr = False, SUMSQ_DEFERRED: tl.constexpr = False):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    k0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    sumsq = tl.zeros([BLOCK_M], tl.float32)
    sumsq2 = tl.zeros([BLOCK_K, BLOCK_M], tl.float32)
    if PROLOGUE == 1 and HAS_RESIDUAL and RESIDUAL_PREPASS:
        if pid == 0:
            for k in range(0, K, BLOCK_K):
                kk = k + k0
                xmask = (kk < K)[:, None] & mmask[None, :]
                rt = m[None, :] * K + kk[:, None]
                s = tl.load(x_ptr + m[None, :] * stride_xm + kk[:, None], mask=xmask, other=0.0)
                s = (s.to(tl.float32) + tl.load(residual_ptr + rt, mask=xmask, other=0.0).to(tl.float32)).to(s.dtype)
                tl.store(residual_out_ptr + rt, s, mask=xmask)
    for k in range(0, K, BLOCK_K):
        kk = k + k0
        kmask = kk < K
        xmask = kmask[:, None] & mmask[None, :]
        xt = x_ptr + m[None, :] * stride_xm + kk[:, None]  # the input's chunk, transposed: [BLOCK_K, BLOCK_M]
        if PROLOGUE == 1:
            s = tl.load(xt, mask=xmask, other=0.0)
            if HAS_RESIDUAL:
                rt = m[None, :] * K + kk[:, None]
                s = (s.to(tl.float32) + tl.load(residual_ptr + rt, mask=xmask, other=0.0).to(tl.float32)).to(s.dtype)
                if not RESIDUAL_PREPASS:
                    if pid == 0:
                        tl.store(residual_out_ptr + rt, s, mask=xmask)
            sf = s.to(tl.float32)
            if SUMSQ_DEFERRED:
                sumsq2 += sf * sf
            else:
                sumsq += tl.sum(sf * sf, axis=0)
            g = tl.load(norm_weight_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
            xin = (sf * g[:, None]).to(s.dtype)
        elif PROLOGUE == 2:
            gate = tl.load(xt, mask=xmask, other=0.0)
            up = tl.load(xt + K, mask=xmask, other=0.0)
            gf = gate.to(tl.float32)
            act = (gf / (1.0 + tl.exp(-gf))).to(gate.dtype)
            xin = (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
        else:
            xin = tl.load(xt, mask=xmask, other=0.0)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + kk[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0.0)
        acc = tl.dot(w, xin, acc)
    if SUMSQ_DEFERRED:
        sumsq = tl.sum(sumsq2, axis=0)
    if PROLOGUE == 1:
        acc = acc * (1.0 / tl.sqrt(sumsq / K + eps))[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=nmask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + m[None, :] * N + n[:, None], acc.to(y_ptr.dtype.element_ty), mask=nmask[:, None] & mmask[None, :])


def _tiles(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, stages), the fastest of scripts/probe_gemv.py's grid on an H200 for each decoder
    shape it measured (docs/benchmarks/h200-2026-12-01-s10/probe-gemv.json)."""
    if n >= 16384:  # gate_up of an 8B: enough programs; a shallower pipeline keeps more of them resident
        return 64, 128, 3
    if k >= 2048 and n <= 4096:  # few rows, long ones: narrower tiles give more programs, deeper chunks
        return 32, 256, 5
    return 64, 128, 5


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
         silu_mul: bool = False, **options):
    """y = op(x) @ weight.T (+ bias) for x [M ≤ 16, K'] with a contiguous last dim, weight [N, K] contiguous.

    op: none; RMSNorm with `norm_weight` (then returns (y, s) where s = x + residual, or x without one);
    SiLU-and-mul with `silu_mul` (x is [M, 2K], gate | up)."""
    m, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    assert m <= MAX_ROWS and x.stride(-1) == 1 and weight.is_contiguous()
    assert x.shape[1] == (2 * k if silu_mul else k)
    prologue = _NORM if norm_weight is not None else _SILU_MUL if silu_mul else _PLAIN
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    residual_out = None
    if residual is not None:
        assert prologue == _NORM and residual.is_contiguous() and residual.shape == x.shape
        residual_out = torch.empty_like(residual)
    block_n, block_k, stages = _tiles(n, k)
    if m:
        _gemv_kernel[(triton.cdiv(n, block_n),)](
            x, residual if residual is not None else x, norm_weight if norm_weight is not None else x, weight,
            bias if bias is not None else weight, y, residual_out if residual_out is not None else y, eps, m, n, k,
            x.stride(0), PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
            BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=MAX_ROWS, num_warps=4, num_stages=stages, **options)
    if prologue != _NORM:
        return y
    return y, (residual_out if residual is not None else x)
