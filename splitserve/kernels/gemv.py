"""Decode's projections at M ≤ 16 rows: a Triton GEMV that reads the weight faster than cuBLAS does there.

At decode's small batch a projection reads its whole weight to produce a few rows, so it is bound by HBM. On an
H200 cuBLAS reads these shapes at 60–93% of what this kernel does (scripts/probe_gemv.py: Qwen3-8B's o_proj
13.3 → 11.2 µs, down_proj 30.3 → 26.1 µs, Qwen3-0.6B's o_proj 13.1 → 5.3 µs). The weight tiles stream through
Triton's software pipeline into a `tl.dot` with the input's rows padded to 16, which costs nothing at this
intensity. SiLU-and-mul runs on the gate/up projection's output (a program reads the gate and the up rows of its
columns), which saves its launch. Fusing an input's op (RMSNorm, SiLU-and-mul) in front of a GEMV was measured
and dropped: an operand computed in registers must pass through shared memory each step, which stalls the
pipeline (2–4× slower, `probe-gemv-prologues.json`). The logits come out in fp32 with no cast launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # the rows one tile holds; more rows than this go to cuBLAS


# The row count varies step to step: specialised on it (== 1, % 16 == 0), Triton would compile a variant the first
# time a prefill of 16 tokens (or a batch of 1) comes, mid-serving, where no graph bucket warmed it up.
@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    # N output columns; with SILU_MUL the weight has 2N rows (gate | up) and a program reads the gate rows and the
    # up rows of its columns, so that it can apply SiLU-and-mul to its own outputs.
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    k0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + k0
        kmask = kk < K
        xt = tl.load(x_ptr + m[None, :] * stride_xm + kk[:, None], mask=kmask[:, None] & mmask[None, :], other=0.0)
        wmask = nmask[:, None] & kmask[None, :]
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + kk[None, :], mask=wmask, other=0.0)
        acc = tl.dot(w, xt, acc)
        if SILU_MUL:
            w_up = tl.load(w_ptr + (N + n[:, None]).to(tl.int64) * K + kk[None, :], mask=wmask, other=0.0)
            acc_up = tl.dot(w_up, xt, acc_up)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=nmask, other=0.0).to(tl.float32)[:, None]
        if SILU_MUL:
            acc_up += tl.load(bias_ptr + N + n, mask=nmask, other=0.0).to(tl.float32)[:, None]
    # rounded to the input's dtype as a 16-bit GEMM's output is (also where y is fp32: the logits)
    out = acc.to(x_ptr.dtype.element_ty)
    if SILU_MUL:  # splitserve.layers.activation's arithmetic: silu in fp32, rounded, times up, rounded
        gate = out.to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)
        out = (act.to(tl.float32) * acc_up.to(x_ptr.dtype.element_ty).to(tl.float32)).to(x_ptr.dtype.element_ty)
    tl.store(y_ptr + m[None, :] * N + n[:, None], out.to(y_ptr.dtype.element_ty), mask=nmask[:, None] & mmask[None, :])


def _tiles(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, stages) for a weight of n rows, the fastest of scripts/probe_gemv.py's grid on an H200
    for each decoder shape it measured (docs/benchmarks/h200-2026-12-01-s10/probe-gemv.json)."""
    if n >= 16384:  # gate_up of an 8B: enough programs; a shallower pipeline keeps more of them resident
        return 64, 128, 3
    if k >= 2048 and n <= 4096:  # few rows, long ones: narrower tiles give more programs, deeper chunks
        return 32, 256, 5
    return 64, 128, 5


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, silu_mul: bool = False,
         out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for x [M ≤ 16, K] with a contiguous last dim and weight [N, K] contiguous.

    `silu_mul`: weight is [gate | up] ([2N, K]) and the result silu(x @ gate.T) * (x @ up.T), [M, N].
    `out_dtype` (fp32 for the logits): the result, rounded to x's dtype first, in that dtype; written into `out`
    (contiguous [M, N]) when given."""
    m, k = x.shape[0], weight.shape[1]
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    assert m <= MAX_ROWS and x.shape[1] == k and x.stride(-1) == 1 and weight.is_contiguous()
    y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device) if out is None else out
    assert y.shape == (m, n) and y.is_contiguous()
    if m:
        block_n, block_k, stages = _tiles(weight.shape[0], k)
        block_n = block_n // 2 if silu_mul else block_n  # the same rows a step: half gate, half up
        _gemv_kernel[(triton.cdiv(n, block_n),)](
            x, weight, bias if bias is not None else weight, y, m, n, k, x.stride(0), HAS_BIAS=bias is not None,
            SILU_MUL=silu_mul, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=MAX_ROWS, num_warps=4, num_stages=stages)
    return y
