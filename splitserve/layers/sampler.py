"""Sampling on the device: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs, and before
them the logit processors: logit_bias, min_tokens, repetition / frequency / presence penalties.

Order (vLLM v1's): logit_bias and the min_tokens mask, then the repetition penalty (HF's: a token seen in the
prompt or output has its logit divided by the penalty if positive, else multiplied), then frequency and
presence (OpenAI's: minus frequency * count - presence * [count > 0], counts over the output only), then
temperature / top-k / top-p / min-p. Structured-output rows then have the tokens their grammar forbids set to
-inf (a token bitmask filled on the host, applied here on the device). Greedy rows take the argmax of the
processed logits. Logprobs stay the model's raw log-softmax (before any processing, the grammar mask too).

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
    max_top_k: int  # the largest top_k of a row (0: no row uses top-k)
    any_top_p: bool
    any_min_p: bool
    max_logprobs: int | None  # None: no row wants logprobs
    any_greedy: bool = True  # some row has temperature 0 (False: no greedy argmax and no per-row choice to make)
    # Logit processors; all None / False when no row uses one (then `sample` does no extra work at all).
    any_penalty: bool = False
    bias: tuple | None = None  # (rows [N] int64, token ids [N] int64, biases [N] float32)
    banned: tuple | None = None  # (rows [M] int64, token ids [M] int64): -inf (min_tokens: EOS, stop ids)
    seen: torch.Tensor | None = None  # [B, V] bool: token in prompt or output (rows with a repetition penalty)
    repetition: torch.Tensor | None = None  # [B] float32, 1 = off
    counts: torch.Tensor | None = None  # [B, V] float32: occurrences in the output (rows with freq/presence)
    frequency: torch.Tensor | None = None  # [B] float32
    presence: torch.Tensor | None = None  # [B] float32
    # Structured outputs: [B, ceil(V / 32)] int32 on the device (bit 1 = allowed), applied to `grammar_rows`
    # only (int32 on the device; None: every row). None when no row has a grammar.
    grammar_bitmask: torch.Tensor | None = None
    grammar_rows: torch.Tensor | None = None


def apply_penalties(logits: torch.Tensor, st: SamplingTensors, inplace: bool = False) -> torch.Tensor:
    """The processed logits: a new tensor, or `logits` itself with `inplace` (the CUDA graph sampler's static rows;
    the CPU's repetition and count penalties are out of place, so use the result)."""
    if not inplace:
        logits = logits.clone()
    if st.bias is not None:
        rows, ids, values = st.bias  # (row, id) pairs are unique: a gather and a plain scatter, no sort
        logits.index_put_((rows, ids), logits[rows, ids] + values)
    if st.banned is not None:
        logits.index_put_(st.banned, logits.new_full((), float("-inf")))  # a fill: no host copy
    if logits.is_cuda and (st.seen is not None or st.counts is not None):  # one pass, not eight (kernels/)
        from splitserve.kernels.penalties import apply_count_penalties_

        return apply_count_penalties_(logits, st.seen, st.repetition, st.counts, st.frequency, st.presence)
    if st.seen is not None:
        penalty = st.repetition[:, None]
        logits = torch.where(st.seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    if st.counts is not None:
        logits = logits - st.frequency[:, None] * st.counts - st.presence[:, None] * (st.counts > 0)
    return logits


def sample(logits: torch.Tensor, st: SamplingTensors):
    """logits: [B, V] float32. Returns (tokens [B] int64, logprob info or None)."""
    raw = logits
    if st.any_penalty:
        logits = apply_penalties(logits, st)
    if st.grammar_bitmask is not None:
        from splitserve.engine.structured_output import apply_bitmask

        if logits is raw and st.max_logprobs is not None:
            logits = logits.clone()  # logprobs stay raw
        apply_bitmask(logits, st.grammar_bitmask, st.grammar_rows)
    greedy = logits.argmax(dim=-1) if st.any_greedy else None
    if st.all_greedy:
        tokens = greedy
    else:
        temp = torch.where(st.temperature > 0, st.temperature, 1.0) if st.any_greedy else st.temperature
        probs = filter_probs((logits / temp[:, None]).softmax(dim=-1), st)
        noise = torch.empty_like(probs).exponential_()
        for i, gen in enumerate(st.generators):
            if gen is not None:
                noise[i].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        tokens = torch.where(st.temperature > 0, sampled, greedy) if st.any_greedy else sampled

    logprob_info = None
    if st.max_logprobs is not None:  # raw: before penalties, bias and temperature
        logprob_info = token_logprobs(raw.log_softmax(dim=-1), tokens, st.max_logprobs)
    return tokens, logprob_info


def filter_probs(probs: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Top-k, then top-p, then min-p: each keeps a row's probabilities at or above a floor and zeroes the rest (not
    renormalised: the exponential race's argmax does not depend on a row's scale). Ties at a floor are all kept."""
    if st.max_top_k:
        k = min(st.max_top_k, probs.shape[-1])
        kth = probs.topk(k, dim=-1).values.gather(-1, (st.top_k.clamp(1, k) - 1)[:, None])
        probs = probs.masked_fill((probs < kth) & (st.top_k > 0)[:, None], 0.0)
    if st.any_top_p:
        target = st.top_p * probs.sum(dim=-1) if st.max_top_k else st.top_p  # top-p of what top-k kept
        probs = probs.masked_fill(probs < top_p_floor(probs, target)[:, None], 0.0)
    if st.any_min_p:
        probs = probs.masked_fill(probs < st.min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def top_p_floor(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B]: the smallest probability of each row's nucleus, the fewest most likely tokens whose mass reaches
    `target` [B] (a row whose whole mass is below it keeps everything). A Triton search on CUDA
    (kernels/top_p.py); this sort on the CPU, its reference."""
    if probs.is_cuda:
        from splitserve.kernels.top_p import top_p_floor as kernel

        return kernel(probs.contiguous(), target)
    sorted_p = probs.sort(dim=-1, descending=True).values
    kept = ((sorted_p.cumsum(dim=-1) - sorted_p) < target[:, None]).sum(dim=-1)  # a prefix: mass before it < target
    return sorted_p.gather(-1, (kept.clamp(min=1) - 1)[:, None])[:, 0]


def token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int):
    """For each row of `logprobs` [N, V]: the logprob of its token, that token's rank (1 = most likely) and the
    top-k (values, indices), or None for k = 0."""
    chosen = logprobs.gather(-1, token_ids[:, None])
    rank = (logprobs > chosen).sum(dim=-1) + 1
    return chosen[:, 0], rank, logprobs.topk(k, dim=-1) if k > 0 else None
