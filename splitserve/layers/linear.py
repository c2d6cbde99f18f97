"""A linear layer that reads its weight faster at decode's batch: on CUDA, with 16-bit weights and at most 16 rows
of input, the product is splitserve.kernels.gemv's Triton GEMV (SiLU-and-mul of a gate/up projection on its
output); otherwise (CPU, fp32, prefill) `nn.Linear`'s, and SiLU-and-mul after it.
`SPLITSERVE_GEMV=0` (or `gemv_rows = 0` before a graph is captured) keeps cuBLAS, to measure the GEMV against."""

from __future__ import annotations

import os

import torch
from torch import nn

from splitserve.layers.activation import silu_and_mul

GEMV_ROWS = 16  # the GEMV tile's rows (kernels.gemv.MAX_ROWS); more rows go to cuBLAS
gemv_rows = GEMV_ROWS if os.environ.get("SPLITSERVE_GEMV", "1") != "0" else 0


def gemv_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.dim() == 2 and 0 < x.shape[0] <= gemv_rows
            and x.stride(-1) == 1 and weight.dtype == x.dtype and weight.is_contiguous())


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
        """x @ weight.T + bias; with `silu_mul` the weight is [gate | up] and the result silu(gate) * up."""
        if gemv_fits(x, self.weight):
            from splitserve.kernels.gemv import gemv

            return gemv(x, self.weight, self.bias, silu_mul=silu_mul)
        y = super().forward(x)
        return silu_and_mul(y) if silu_mul else y
