"""Projections with their input's elementwise op in front: RMSNorm (+ residual add) → linear, SiLU-and-mul →
linear, or the linear alone. On CUDA at decode's batch (≤ 16 rows, 16-bit weights) each is one Triton GEMV
(splitserve.kernels.gemv) that runs the op on its input as it streams the weights; elsewhere (CPU, fp32, prefill)
the op, then `nn.Linear`. `SPLITSERVE_GEMV=0` (or `gemv_rows = 0` before a graph is captured) turns the GEMV off,
to measure it against."""

from __future__ import annotations

import os

import torch
from torch import nn

from splitserve.layers.activation import silu_and_mul
from splitserve.layers.norm import RMSNorm

GEMV_ROWS = 16  # the GEMV tile's rows (kernels.gemv.MAX_ROWS); more rows go to cuBLAS
gemv_rows = GEMV_ROWS if os.environ.get("SPLITSERVE_GEMV", "1") != "0" else 0


gemv_fuse = True  # False: the norm / SiLU as their own kernels, then the plain GEMV (to measure the fusion)


def _gemv_fits(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and 0 < x.shape[0] <= gemv_rows


def norm_linear(norm: RMSNorm, linear: nn.Linear, x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(norm(x + residual)), x + residual); without a residual, (linear(norm(x)), x)."""
    if _gemv_fits(x) and gemv_fuse:
        from splitserve.kernels.gemv import gemv

        return gemv(x, linear.weight, linear.bias, norm_weight=norm.weight, eps=norm.eps, residual=residual)
    hidden, residual = (norm(x), x) if residual is None else norm(x, residual)
    return project(linear, hidden), residual


def silu_mul_linear(linear: nn.Linear, gate_up: torch.Tensor) -> torch.Tensor:
    """linear(silu(gate) * up) for gate_up = [gate | up]."""
    if _gemv_fits(gate_up) and gemv_fuse:
        from splitserve.kernels.gemv import gemv

        return gemv(gate_up, linear.weight, linear.bias, silu_mul=True)
    return project(linear, silu_and_mul(gate_up))


def project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if _gemv_fits(x):
        from splitserve.kernels.gemv import gemv

        return gemv(x, linear.weight, linear.bias)
    return linear(x)
