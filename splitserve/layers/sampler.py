"""Sampling on the device: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Sampling uses the exponential race (argmax p_i / q_i with q_i ~ Exp(1)), which draws from p exactly and
lets a seeded request take its noise from its own generator, so its output does not depend on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    generators: list  # per row: torch.Generator or None
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    max_logprobs: int | None  # None: no row wants logprobs


def sample(logits: torch.Tensor, st: SamplingTensors):
    """logits: [B, V] float32. Returns (tokens [B] int64, logprob info or None)."""
    greedy = logits.argmax(dim=-1)
    if st.all_greedy:
        tokens = greedy
    else:
        temp = torch.where(st.temperature > 0, st.temperature, torch.ones_like(st.temperature))
        scaled = logits / temp[:, None]
        if st.any_top_k or st.any_top_p:
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
            if st.any_top_k:
                k = torch.where(st.top_k > 0, st.top_k, torch.full_like(st.top_k, logits.shape[-1]))
                rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
                sorted_logits = sorted_logits.masked_fill(rank >= k[:, None], float("-inf"))
            if st.any_top_p:
                sorted_probs = sorted_logits.softmax(dim=-1)
                mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
                sorted_logits = sorted_logits.masked_fill(mass_before >= st.top_p[:, None], float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter_(-1, order, sorted_logits)
        probs = scaled.softmax(dim=-1)
        if st.any_min_p:
            floor = st.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
        noise = torch.empty_like(probs).exponential_()
        for i, gen in enumerate(st.generators):
            if gen is not None:
                noise[i].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        tokens = torch.where(st.temperature > 0, sampled, greedy)

    logprob_info = None
    if st.max_logprobs is not None:
        logprobs = logits.log_softmax(dim=-1)
        chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
        top = logprobs.topk(st.max_logprobs, dim=-1) if st.max_logprobs > 0 else None
        logprob_info = (chosen, top)
    return tokens, logprob_info
