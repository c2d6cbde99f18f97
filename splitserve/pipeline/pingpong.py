"""Micro-batch ping-pong for decode: the attention of one micro-batch overlaps the GEMMs of another.

A decode batch is cut into micro-batches, evenly or not (`microbatch_bounds`). Each micro-batch runs the
model's own stages in the model's order (CausalLM.stages: compute and memory alternating), so the result
is the plain forward's. Only *where* a stage runs changes: memory stages (rotary, KV write, paged
attention) go to the memory stream, compute stages (every GEMM and norm) to the compute stream — two
green-context partitions on a GPU — and events order each micro-batch's stages. With two micro-batches,
C(m, l) the compute stage before attention l and M(m, l) attention l:

    compute stream:  C0(0) C1(0) C0(1)  C1(1)  C0(2) ...
    memory stream:         M0(0) M1(0)  M0(1)  M1(1) ...     M(m, l) waits C(m, l); C(m, l+1) waits M(m, l)

so M0(l) runs beside C1(l) and M1(l) beside C0(l+1). Without streams (CPU) the same order runs serially.
This module only decides where and when each stage runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splitserve.layers.attention import AttentionMetadata
from splitserve.models.llama import Handoff, Stage

# How to cut a batch: n (near-)equal parts, explicit sizes, or fractions of the batch.
MicroBatches = int | Sequence[int] | Sequence[float]


def microbatch_bounds(batch_size: int, microbatches: MicroBatches) -> list[tuple[int, int]]:
    """Contiguous [start, end) row ranges that cover the batch.
    - an int n: n parts whose sizes differ by at most one, the larger ones first (odd batches welcome);
    - ints: those sizes, which must add up to the batch;
    - floats: those shares of the batch (positive, adding up to 1), the cuts rounded to the nearest row.
    A micro-batch that would be empty is left out: a batch of 1 is one micro-batch."""
    if isinstance(microbatches, int) and not isinstance(microbatches, bool):
        n = max(1, min(microbatches, batch_size))
        base, extra = divmod(batch_size, n)
        sizes = [base + (1 if i < extra else 0) for i in range(n)]
    elif all(isinstance(s, int) and not isinstance(s, bool) for s in microbatches):
        sizes = list(microbatches)
        if any(s < 0 for s in sizes) or sum(sizes) != batch_size:
            raise ValueError(f"micro-batch sizes {sizes} do not add up to the batch of {batch_size}")
    else:
        shares = [float(s) for s in microbatches]
        if any(not s > 0 for s in shares) or not math.isclose(sum(shares), 1.0, abs_tol=1e-6):
            raise ValueError(f"micro-batch fractions {shares} must be positive and add up to 1")
        cuts, total = [], 0.0
        for share in shares[:-1]:
            total += share
            cuts.append(min(batch_size, math.floor(total * batch_size + 0.5)))  # round half up, not to even
        cuts.append(batch_size)
        sizes = [end - start for start, end in zip([0, *cuts], cuts)]
    bounds, start = [], 0
    for size in sizes:
        if size > 0:
            bounds.append((start, start + size))
        start += size
    return bounds


def split_decode_meta(meta: AttentionMetadata, start: int, end: int) -> AttentionMetadata:
    """The metadata of rows [start, end) of a decode batch (one new token per sequence)."""
    return AttentionMetadata(
        slot_mapping=meta.slot_mapping[start:end], query_start_loc=meta.query_start_loc[: end - start + 1],
        seq_lens=meta.seq_lens[start:end], block_tables=meta.block_tables[start:end], max_query_len=1,
        max_seq_len=meta.max_seq_len,
        query_start_loc_cpu=list(range(end - start + 1)) if meta.query_start_loc_cpu is not None else None,
        seq_lens_cpu=meta.seq_lens_cpu[start:end] if meta.seq_lens_cpu is not None else None)


@dataclass
class StageStreams:
    """Where stages run: the memory and compute partitions' streams (None: the current stream)."""
    memory: torch.cuda.Stream | None = None
    compute: torch.cuda.Stream | None = None


class PingPong:
    """A stage schedule for `CausalLM.forward`: a decode batch in micro-batches, each stage kind on its own
    stream. Query_start_loc must be arange (decode). Works eagerly and under CUDA-graph capture (the
    streams fork from and join back into the capturing stream). `stage_events`, when given (GPU), receives
    (kind, micro-batch, layer, start, end) timing events; they are external events, so inside a graph they
    become event-record nodes that time each replay."""

    def __init__(self, microbatches: MicroBatches = 2, streams: StageStreams | None = None,
                 stage_events: list | None = None):
        self.microbatches = microbatches
        self.streams = streams or StageStreams()
        self.stage_events = stage_events
        self.slot: str | None = None  # the stream ("memory" | "compute") the running stage was put on

    def __call__(self, stages: list[Stage], positions: torch.Tensor, hidden_all: torch.Tensor,
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        streams, events = self.streams, self.stage_events
        if events is not None:
            events.clear()  # keep only the latest (captured) step's events
        bounds = microbatch_bounds(hidden_all.shape[0], self.microbatches)
        lanes = {"memory": streams.memory, "compute": streams.compute}
        on_gpu = streams.memory is not None and streams.compute is not None
        main = torch.cuda.current_stream() if on_gpu else None
        metas = [split_decode_meta(meta, a, b) for a, b in bounds]
        x = [Handoff(None, hidden=hidden_all[a:b]) for a, b in bounds]
        # Every hand-off from one stream to the other stays referenced until the step ends. The caching
        # allocator gives a freed block back to the stream that allocated it, so a QKV output dropped while
        # the memory stream still reads it could become the next compute stage's scratch. (Under graph
        # capture record_stream would hold such blocks until the capture ends anyway: same memory.)
        handoffs: list = [hidden_all]
        done: list = [_record(main) if on_gpu else None] * len(bounds)  # micro-batch m's last stage
        for stage in stages:
            self.slot, stream = stage.kind, lanes[stage.kind]
            for m, (a, b) in enumerate(bounds):
                with _on(stream):
                    if on_gpu:
                        stream.wait_event(done[m])
                    start = _timing_event(stream, events)
                    x[m] = stage.run(positions[a:b], x[m], metas[m])
                    done[m] = _stage_done(stream, events, (stage.kind, m, stage.layer, start))
                handoffs.append(x[m])
        self.slot = None
        if on_gpu:  # join both streams back (a capture fails if a forked stream is left unjoined)
            main.wait_event(_record(streams.memory))
            main.wait_event(_record(streams.compute))
        out = torch.cat([h.hidden for h in x]), torch.cat([h.residual for h in x])
        handoffs.clear()
        return out


class _on:
    """`with torch.cuda.stream(s)` that is a no-op for None (CPU)."""

    def __init__(self, stream):
        self.ctx = torch.cuda.stream(stream) if stream is not None else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _record(stream) -> torch.cuda.Event:
    """A plain (dependency) event on `stream`: fork/join edges inside a graph capture."""
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _timing_event(stream, stage_events):
    if stream is None or stage_events is None:
        return None
    event = torch.cuda.Event(enable_timing=True, external=True)
    event.record(stream)
    return event


def _stage_done(stream, stage_events, stage: tuple):
    """The event the other stream waits on; with profiling also the stage's end timing event."""
    if stream is None:
        return None
    if stage_events is not None:
        stage_events.append((*stage, _timing_event(stream, stage_events)))
    return _record(stream)
