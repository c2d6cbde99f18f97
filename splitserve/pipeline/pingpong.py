"""Micro-batch ping-pong for decode: attention of one micro-batch overlaps the FFN of another.

A decode batch is cut into micro-batches. Every layer keeps the model's own order for each micro-batch
(attention stage, then FFN stage, then the next layer), so the result is the plain forward's. Only
*where* a stage runs changes: attention stages go to the attention stream, FFN stages to the FFN stream
(two green-context partitions on a GPU), and events order each micro-batch's stages:

    attention stream:  A0(l)  A1(l)  A0(l+1)  A1(l+1) ...
    FFN stream:               F0(l)  F1(l)    F0(l+1) ...      F(m, l) waits A(m, l); A(m, l+1) waits F(m, l)

so A1(l) runs beside F0(l) and A0(l+1) beside F1(l). Without streams (CPU) the same order runs serially.
The stages are the model's own (CausalLM.stages); this module only decides where and when each runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.layers.attention import AttentionMetadata


def microbatch_bounds(batch_size: int, num_microbatches: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) row ranges, sizes differing by at most one (odd batches welcome)."""
    n = max(1, min(num_microbatches, batch_size))
    base, extra = divmod(batch_size, n)
    bounds, start = [], 0
    for i in range(n):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
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
    """Where stages run: the attention and FFN partitions' streams (None: the current stream)."""
    attention: torch.cuda.Stream | None = None
    ffn: torch.cuda.Stream | None = None


class PingPong:
    """A stage schedule for `CausalLM.forward`: a decode batch in micro-batches, each stage kind on its own
    stream. Query_start_loc must be arange (decode). Works eagerly and under CUDA-graph capture (the
    streams fork from and join back into the capturing stream). `stage_events`, when given (GPU), receives
    (kind, micro-batch, layer, start, end) timing events; they are external events, so inside a graph they
    become event-record nodes that time each replay."""

    def __init__(self, num_microbatches: int = 2, streams: StageStreams | None = None,
                 stage_events: list | None = None):
        self.num_microbatches = num_microbatches
        self.streams = streams or StageStreams()
        self.stage_events = stage_events

    def __call__(self, stages, positions: torch.Tensor, hidden_all: torch.Tensor, meta: AttentionMetadata):
        streams, events = self.streams, self.stage_events
        if events is not None:
            events.clear()  # keep only the latest (captured) step's events
        bounds = microbatch_bounds(hidden_all.shape[0], self.num_microbatches)
        on_gpu = streams.attention is not None and streams.ffn is not None
        main = torch.cuda.current_stream() if on_gpu else None
        metas = [split_decode_meta(meta, a, b) for a, b in bounds]
        hidden = [hidden_all[a:b] for a, b in bounds]
        residual: list = [None] * len(bounds)
        # Every tensor handed from one stream to the other stays referenced until the step ends. The caching
        # allocator gives a freed block back to the stream that allocated it, so an attention output dropped
        # while the FFN stream still reads it could become the next attention stage's scratch. (Under graph
        # capture record_stream would hold such blocks until the capture ends anyway: same memory.)
        handoffs: list = [hidden_all]
        done: list = [_record(main) if on_gpu else None] * len(bounds)  # micro-batch m's last stage
        for stage in stages:
            stream = getattr(streams, stage.kind)
            for m, (a, b) in enumerate(bounds):
                with _on(stream):
                    if on_gpu:
                        stream.wait_event(done[m])
                    start = _timing_event(stream, events)
                    hidden[m], residual[m] = stage.run(positions[a:b], hidden[m], residual[m], metas[m])
                    done[m] = _stage_done(stream, events, (stage.kind, m, stage.layer, start))
                handoffs += [hidden[m], residual[m]]
        if on_gpu:  # join both streams back (a capture fails if a forked stream is left unjoined)
            main.wait_event(_record(streams.attention))
            main.wait_event(_record(streams.ffn))
        out = torch.cat(hidden), torch.cat(residual)
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
