"""The count-based logit processors in one pass (CUDA path): HF's repetition penalty on the tokens seen in
the prompt or output, then OpenAI's frequency and presence penalties on the output counts.

The torch reference (layers/sampler.py: apply_penalties) makes about eight passes over the [B, V] logits
(one temporary each); this reads the logits, `seen` and `counts` once and writes the logits once. The
operations are the reference's, in its order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _count_penalties_kernel(logits_ptr, seen_ptr, counts_ptr, rep_ptr, freq_ptr, pres_ptr, V,
                            HAS_REP: tl.constexpr, HAS_COUNT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    off = row.to(tl.int64) * V + cols
    x = tl.load(logits_ptr + off, mask=mask, other=0.0)
    if HAS_REP:
        p = tl.load(rep_ptr + row)
        seen = tl.load(seen_ptr + off, mask=mask, other=0)
        x = tl.where(seen != 0, tl.where(x < 0, x * p, x / p), x)
    if HAS_COUNT:
        c = tl.load(counts_ptr + off, mask=mask, other=0.0)
        f = tl.load(freq_ptr + row)
        pr = tl.load(pres_ptr + row)
        x = (x - f * c) - pr * (c > 0).to(tl.float32)
    tl.store(logits_ptr + off, x, mask=mask)


def apply_count_penalties_(logits: torch.Tensor, seen: torch.Tensor | None, repetition: torch.Tensor | None,
                           counts: torch.Tensor | None, frequency: torch.Tensor | None,
                           presence: torch.Tensor | None) -> torch.Tensor:
    """In place on `logits` [B, V] float32 (contiguous): `seen` [B, V] bool with `repetition` [B], and/or
    `counts` [B, V] float32 with `frequency`, `presence` [B]."""
    B, V = logits.shape
    assert logits.is_contiguous() and logits.dtype == torch.float32
    seen = seen.contiguous() if seen is not None else None
    counts = counts.contiguous() if counts is not None else None
    _count_penalties_kernel[(B, triton.cdiv(V, BLOCK))](
        logits, seen if seen is not None else logits, counts if counts is not None else logits,
        repetition if repetition is not None else logits, frequency if frequency is not None else logits,
        presence if presence is not None else logits, V, HAS_REP=seen is not None, HAS_COUNT=counts is not None,
        BLOCK=BLOCK)
    return logits
