"""A step's sampling as one CUDA graph replay (CUDA only).

Eagerly, the sampler is about 15 launches: 0.4 ms of host time a step at batch 64, 0.7 ms in a structured-output
step, where it sits on the critical path between the host's mask fill and the device (H200,
docs/STRUCTURED-OUTPUT.md). A replay costs a few tens of microseconds. The graphs capture `layers/sampler.py:
sample` itself over static inputs, one per (batch bucket, which filters the batch uses), the first time that
combination is sampled (a warm-up, then a capture: once, a few milliseconds).

What a replay reads: the logits, which the runner's `compute_logits` writes into `logits` here; the per-row
temperature / top-k / top-p / min-p, copied in when the batch's rows change; the grammar bitmask, copied in per
step and applied to every row (rows without a grammar, and padding rows, allow every token). The logit processors
(logit_bias, min_tokens, penalties) run before the replay, eagerly and in place: their inputs change shape.

Sampled eagerly instead, counted per reason in `stats()`: all-greedy batches (one argmax: no launches to save),
rows with a seed (their noise comes from generators of their own), rows that want logprobs (they need the raw
logits), batches larger than the largest bucket, and any combination past MAX_GRAPHS.

Random numbers: a captured `exponential_` draws from the default CUDA generator at a new offset each replay, as
the eager sampler does.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

import torch

from splitserve.layers.sampler import SamplingTensors, apply_penalties, sample

logger = logging.getLogger("splitserve")

MAX_GRAPHS = 32  # a client cycling through top_k values must not make the engine capture without end


@dataclass(frozen=True)
class _Key:
    bucket: int
    any_greedy: bool
    top_k: int  # the batch's largest top_k rounded up to a power of two (0: off): the same floors for every row
    top_p: bool
    min_p: bool
    bitmask: bool


class SamplerGraphs:
    def __init__(self, device: torch.device, vocab_size: int, buckets: list[int]):
        self.device, self.vocab_size, self.buckets = device, vocab_size, sorted(buckets)
        rows = self.buckets[-1]
        self.logits = torch.zeros(rows, vocab_size, dtype=torch.float32, device=device)
        self.bitmask = torch.full((rows, -(-vocab_size // 32)), -1, dtype=torch.int32, device=device)
        # Per-row parameters; padding rows keep neutral values (temperature 1, no filter).
        self.temperature = torch.ones(rows, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.int64, device=device)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=device)
        self.min_p = torch.zeros(rows, dtype=torch.float32, device=device)
        self.tokens = torch.zeros(rows, dtype=torch.int64, device=device)
        self.graphs: dict[_Key, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()  # shared: the graphs replay one at a time, outputs copied out
        self.stream = torch.cuda.Stream(device)
        self._params: tuple | None = None  # the SamplingTensors' row tensors copied in last (kept: identity check)
        self.replays = 0
        self.eager: collections.Counter[str] = collections.Counter()  # steps sampled eagerly, per reason
        self.failed: str | None = None  # a capture that failed turns the graphs off (logged once)

    def logits_for(self, num_rows: int) -> torch.Tensor | None:
        """Where the runner writes a step's logits: the static rows, or None for a batch no bucket holds."""
        return self.logits[:num_rows] if num_rows <= self.buckets[-1] else None

    def stats(self) -> dict:
        return {"graphs": len(self.graphs), "replays": self.replays, "eager_steps": dict(self.eager),
                "failed": self.failed}

    def _eager_reason(self, logits: torch.Tensor, st: SamplingTensors) -> str | None:
        if self.failed is not None:
            return "capture failed"
        if st.all_greedy:
            return "all greedy"
        if st.max_logprobs is not None:
            return "logprobs"
        if any(g is not None for g in st.generators):
            return "seeded rows"
        if logits.data_ptr() != self.logits.data_ptr():
            return "batch larger than the largest bucket"
        return None

    def sample(self, logits: torch.Tensor, st: SamplingTensors,
               grammar: tuple[torch.Tensor, list[int]] | None = None) -> torch.Tensor | None:
        """The tokens [B] (a tensor of their own) sampled by a replay, or None where the caller samples eagerly.
        `logits` [B, V]: `logits_for(B)`, processed here in place. `grammar`: (pinned host bitmask, its rows)."""
        reason = self._eager_reason(logits, st)
        if reason is not None:
            self.eager[reason] += 1
            return None
        B = logits.shape[0]
        bucket = next(b for b in self.buckets if b >= B)
        top_k = 0 if not st.max_top_k else min(1 << (st.max_top_k - 1).bit_length(), self.vocab_size)
        key = _Key(bucket, st.any_greedy, top_k, st.any_top_p, st.any_min_p, grammar is not None)
        if key not in self.graphs and len(self.graphs) >= MAX_GRAPHS:
            self.eager["graph limit"] += 1
            return None
        if st.any_penalty:
            apply_penalties(logits, st, inplace=True)
        if grammar is not None:
            host, rows = grammar
            if len(rows) < B:  # the rows without a grammar allow everything
                free = torch.ones(B, dtype=torch.bool)
                free[rows] = False
                host[:B][free] = -1
            self.bitmask[:B].copy_(host[:B], non_blocking=True)
            if B < bucket:
                self.bitmask[B:bucket].fill_(-1)
        self._load_params(st, B)
        graph = self.graphs.get(key) or self._capture(key)
        if graph is None:  # the inputs are processed already: sample them as the graph would have
            self.eager["capture failed"] += 1
            return sample(self.logits[:bucket], self._static_tensors(key))[0][:B]
        graph.replay()
        self.replays += 1
        return self.tokens[:B].clone()  # the next replay overwrites `tokens`; later steps read these

    def _load_params(self, st: SamplingTensors, B: int) -> None:
        src = (st.temperature, st.top_k, st.top_p, st.min_p)
        if self._params is not None and all(a is b for a, b in zip(src, self._params)):
            return  # the same rows as the last step: already in place
        self._params = src
        for static, value, neutral in zip((self.temperature, self.top_k, self.top_p, self.min_p), src, (1, 0, 1, 0)):
            static[:B].copy_(value)
            static[B:].fill_(neutral)

    def _static_tensors(self, key: _Key) -> SamplingTensors:
        b = key.bucket
        return SamplingTensors(self.temperature[:b], self.top_k[:b], self.top_p[:b], self.min_p[:b], [None] * b,
                               False, key.top_k, key.top_p, key.min_p, None, key.any_greedy,
                               grammar_bitmask=self.bitmask[:b] if key.bitmask else None)

    def _capture(self, key: _Key) -> torch.cuda.CUDAGraph | None:
        """Warm up and capture `sample` for `key` over the static inputs (which hold this step's: the warm-up's
        in-place bitmask is the one the replay applies again)."""
        b, st = key.bucket, self._static_tensors(key)
        logits, graph = self.logits[:b], torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(self.stream):
                sample(logits, st)  # warm-up: Triton compiles before the capture
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    self.tokens[:b].copy_(sample(logits, st)[0])
                finally:
                    graph.capture_end()
        except RuntimeError as e:
            self.failed = f"{type(e).__name__}: {e}"
            logger.warning("sampling runs eagerly from now on: capturing its CUDA graph failed (%s)", self.failed)
            return None
        finally:
            torch.cuda.current_stream().wait_stream(self.stream)
        self.graphs[key] = graph
        logger.debug("captured the sampling graph %s (%d in all)", key, len(self.graphs))
        return graph
