"""Decode's projections at M ≤ 16 rows: a Triton GEMV that reads the weight faster than cuBLAS does there.

At decode's small batch a projection reads its whole weight to produce a few rows, so it is bound by HBM. On an
H200 cuBLAS reads these shapes at 60–93% of what this kernel does (scripts/probe_gemv.py: Qwen3-8B's o_proj
13.3 → 11.2 µs, down_proj 30.3 → 26.1 µs, Qwen3-0.6B's o_proj 13.1 → 5.3 µs). The weight tiles stream through
Triton's software pipeline into a `tl.dot` with the input's rows padded to 16, which costs nothing at this
intensity. Fusing the input's op (RMSNorm, SiLU-and-mul) in front was measured and dropped: an operand computed
in registers must pass through shared memory each step, which stalls the pipeline (2–4× slower,
`probe-gemv-prologues.json`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # the rows one tile holds; more rows than this go to cuBLAS


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    k0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + k0
        kmask = kk < K
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + kk[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0.0)
        xt = tl.load(x_ptr + m[None, :] * stride_xm + kk[:, None], mask=kmask[:, None] & mmask[None, :], other=0.0)
        acc = tl.dot(w, xt, acc)
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


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for x [M ≤ 16, K] with a contiguous last dim and weight [N, K] contiguous."""
    m, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    assert m <= MAX_ROWS and x.shape[1] == k and x.stride(-1) == 1 and weight.is_contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block_n, block_k, stages = _tiles(n, k)
        _gemv_kernel[(triton.cdiv(n, block_n),)](
            x, weight, bias if bias is not None else weight, y, m, n, k, x.stride(0), HAS_BIAS=bias is not None,
            BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=MAX_ROWS, num_warps=4, num_stages=stages)
    return y
