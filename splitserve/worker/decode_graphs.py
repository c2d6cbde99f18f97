"""Decode CUDA graphs: static inputs, one plain graph per batch bucket, pipelined graphs per (path, bucket), and
the plain graphs captured again on the decode partition of a prefill ‖ decode split (pipeline/pd_multiplex.py).

One object owns capture, replay and timing, keyed by a typed `DecodePath`. The decode planner
(pipeline/planner.py) times paths and captures pipelined graphs through it and then chooses per step;
nothing else reaches inside.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from splitserve.bench.timing import replay_seconds
from splitserve.layers.attention import AttentionMetadata
from splitserve.pipeline.profiling import StepProfiler
from splitserve.worker.inputs import fake_batch, prepare_inputs


@dataclass(frozen=True)
class DecodePath:
    """How a decode step runs: eagerly, as the plain CUDA graph, pipelined on an SM split (compute | memory
    stages, pipeline/pingpong.py), or as the plain graph on the decode partition of a prefill ‖ decode split
    (memory_sm: that partition's SMs)."""
    kind: str  # "eager" | "plain" | "pipeline" | "partition"
    memory_sm: int | None = None  # the split's real sizes (pipeline, partition)
    compute_sm: int | None = field(default=None, compare=False)  # the rest of the GPU: implied by memory_sm
    first_fraction: float = 0.5  # pipeline: the first of its two micro-batches' fraction of the rows

    @classmethod
    def parse(cls, name: str) -> DecodePath:
        kind, *fields = name.split(":")
        counts = {"eager": (0,), "plain": (0,), "partition": (1,), "pipeline": (1, 2)}  # fields each kind takes
        fraction = 0.5
        if len(fields) == 2:
            try:
                fraction = float(fields[1])
            except ValueError:
                fraction = -1.0
        if len(fields) not in counts.get(kind, ()) or (fields and not fields[0].isdigit()) or not 0 < fraction < 1:
            raise ValueError(f"not a decode path: {name!r}")
        return cls(kind, int(fields[0]) if fields else None, None, fraction)

    @property
    def name(self) -> str:
        """Stable text form (plan files, profiles): "eager", "plain", "pipeline:<memory SMs>", with uneven
        micro-batches "pipeline:<memory SMs>:<first fraction>"."""
        if self.memory_sm is None:
            return self.kind
        return f"{self.kind}:{self.memory_sm}" + (f":{self.first_fraction:g}" if self.first_fraction != 0.5 else "")

    @property
    def microbatches(self) -> tuple[float, float]:
        """The pipeline's micro-batch fractions (PingPong's `microbatches`)."""
        return self.first_fraction, 1.0 - self.first_fraction

    @property
    def stats_name(self) -> str:
        return {"plain": "cuda_graph", "partition": "cuda_graph_pd_partition"}.get(self.kind, self.kind)

    def __str__(self) -> str:
        return self.name


EAGER, PLAIN = DecodePath("eager"), DecodePath("plain")


def pipeline_path(memory_sm: int, compute_sm: int | None = None, first_fraction: float = 0.5) -> DecodePath:
    return DecodePath("pipeline", memory_sm, compute_sm, first_fraction)


class _Stage:
    """Pinned host mirrors of the static inputs, so one step's inputs travel in three copies."""

    def __init__(self, max_num_seqs: int, width: int):
        self.i64 = torch.zeros(3, max_num_seqs, dtype=torch.int64).pin_memory()
        self.seq_lens = torch.zeros(max_num_seqs, dtype=torch.int32).pin_memory()
        self.tables = torch.zeros(max_num_seqs, width, dtype=torch.int32).pin_memory()
        self.copied = torch.cuda.Event()  # recorded after this set's copies; never recorded: done


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    output: torch.Tensor
    stage_events: list | None = None  # with profiling: stage timing events recorded inside the graph


class DecodeGraphs:
    def __init__(self, model, device: torch.device, max_num_seqs: int, max_model_len: int, block_size: int,
                 num_kv_blocks: int, profiling: bool = False):
        self.model, self.device = model, device
        self.max_model_len, self.block_size, self.num_kv_blocks = max_model_len, block_size, num_kv_blocks
        self.buckets = sorted({b for b in (1, 2, 4, 8) if b < max_num_seqs} | set(range(16, max_num_seqs, 16))
                              | {max_num_seqs})
        self.plain: dict[int, _Graph] = {}
        self.pipelined: dict[tuple[DecodePath, int], _Graph] = {}  # every graph but the plain ones
        self.planner = None  # pipeline.planner.DecodePlanner, once the pipeline is set up
        self.split_path: DecodePath | None = None  # PD multiplexing: the partition graphs to replay meanwhile
        self.profiler = StepProfiler() if profiling else None
        self.last_path: DecodePath | None = None
        self.capture_time_s = 0.0
        width = -(-max_model_len // block_size)
        # Static graph inputs, and pinned host mirrors so one step's inputs travel in three copies.
        self.i64 = torch.zeros(3, max_num_seqs, dtype=torch.int64, device=device)  # ids, positions, slots
        self.seq_lens = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self.tables = torch.zeros(max_num_seqs, width, dtype=torch.int32, device=device)
        self.query_start = torch.arange(max_num_seqs + 1, dtype=torch.int32, device=device)
        # Two sets of staging buffers, taken in turn: with async scheduling, step N + 1's inputs are written on
        # the host while step N's copies may still wait in the stream; each set's event marks its copies done.
        self.stages = [_Stage(max_num_seqs, width) for _ in range(2)]
        self.turn = 0
        self.i64[2].fill_(-1)
        self.pool = torch.cuda.graph_pool_handle()  # one pool: graphs replay one at a time
        mem0 = self.free_memory()
        for bucket in reversed(self.buckets):  # largest first so smaller graphs reuse its pool memory
            self.plain[bucket] = self._capture(bucket)
        self.memory_bytes = mem0 - self.free_memory()

    # ---- capture ----
    def _capture(self, bucket: int, schedule=None, stream: torch.cuda.Stream | None = None) -> _Graph:
        t0 = time.perf_counter()
        args = (self.i64[0, :bucket], self.i64[1, :bucket], self._meta(bucket), schedule)
        with torch.no_grad():
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # a None stream: the current one
                self.model(*args)  # warm up (Triton compiles, cuBLAS picks kernels and sets up its workspaces)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                output = self.model(*args)
        torch.cuda.synchronize(self.device)
        self.capture_time_s += time.perf_counter() - t0
        return _Graph(graph, output, getattr(schedule, "stage_events", None))

    def capture_pipelined(self, path: DecodePath, bucket: int, schedule) -> None:
        """The decode step for `bucket` rows under a stage schedule (pipeline.pingpong.PingPong on one SM
        split) as one graph: it forks onto the partitions' streams and joins back, and keeps the partition
        it was captured on. With profiling, the schedule's events time every stage on each replay."""
        self.pipelined[(path, bucket)] = self._capture(bucket, schedule)

    def capture_on(self, path: DecodePath, bucket: int, stream: torch.cuda.Stream) -> None:
        """The plain decode step for `bucket` rows captured on `stream` (a green-context partition's): it keeps
        that partition's SMs wherever it is replayed."""
        self.pipelined[(path, bucket)] = self._capture(bucket, stream=stream)

    def drop(self, path: DecodePath) -> None:
        for key in [k for k in self.pipelined if k[0] == path]:
            del self.pipelined[key]

    def keep_pipelined(self, keep: set[tuple[DecodePath, int]]) -> None:
        for key in [k for k in self.pipelined if k not in keep]:
            del self.pipelined[key]

    def free_memory(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.mem_get_info(self.device)[0]

    def _meta(self, bucket: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.i64[2, :bucket], query_start_loc=self.query_start[: bucket + 1],
                                 seq_lens=self.seq_lens[:bucket], block_tables=self.tables[:bucket],
                                 max_query_len=1, max_seq_len=self.max_model_len)

    def _graph(self, path: DecodePath, bucket: int) -> _Graph:
        return self.plain[bucket] if path == PLAIN else self.pipelined[(path, bucket)]

    # ---- replay ----
    def bucket_for(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    def choose(self, num_seqs: int, mean_ctx: float) -> tuple[DecodePath, int] | None:
        """(path, bucket) of a decode step, or None when no graph fits the batch."""
        bucket = self.bucket_for(num_seqs)
        if bucket is None:
            return None
        if self.split_path is not None:
            return self.split_path, bucket
        if self.planner is None:
            return PLAIN, bucket
        return self.planner.choose(num_seqs, bucket, mean_ctx)

    def _load(self, host: dict[str, np.ndarray], num_seqs: int, bucket: int) -> None:
        """Copy one step's inputs into the static buffers (padding rows: token 0, no KV write, empty context)."""
        stage = self.stages[self.turn]
        self.turn ^= 1
        stage.copied.synchronize()  # its copies were enqueued two steps ago: done already, in practice
        i64 = stage.i64.numpy()
        i64[:, num_seqs:bucket] = ((0,), (0,), (-1,))
        i64[0, :num_seqs], i64[1, :num_seqs], i64[2, :num_seqs] = (
            host["input_ids"], host["positions"], host["slot_mapping"])
        lens = stage.seq_lens.numpy()
        lens[num_seqs:bucket] = 0
        lens[:num_seqs] = host["seq_lens"]
        tables = host["block_tables"]
        width = tables.shape[1]
        stage.tables.numpy()[:num_seqs, :width] = tables
        self.i64[:, :bucket].copy_(stage.i64[:, :bucket], non_blocking=True)
        self.seq_lens[:bucket].copy_(stage.seq_lens[:bucket], non_blocking=True)
        self.tables[:num_seqs, :width].copy_(stage.tables[:num_seqs, :width], non_blocking=True)
        stage.copied.record()

    def replay(self, host: dict[str, np.ndarray], num_seqs: int, path: DecodePath, bucket: int,
               fill_ids: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Run one decode step; returns the final hidden states of the `num_seqs` real rows. `fill_ids` writes
        the input ids that are still on the device (async scheduling) into the static input buffer."""
        self._load(host, num_seqs, bucket)
        if fill_ids is not None:
            fill_ids(self.i64[0, :num_seqs])
        g = self._graph(path, bucket)
        if self.profiler is not None:
            self.profiler.start()
        g.graph.replay()
        self.last_path = path
        if self.profiler is not None:
            self.profiler.stop(path=path.name, num_seqs=num_seqs, bucket=bucket,
                               mean_ctx=float(host["seq_lens"].mean()), memory_sm=path.memory_sm,
                               compute_sm=path.compute_sm, stage_events=g.stage_events)
        return g.output[:num_seqs]

    def time(self, path: DecodePath, bucket: int, ctx: int, iters: int = 5) -> float:
        """GPU time (ms) of one replay of `path`'s graph over a fake batch of `bucket` sequences with `ctx`
        cached tokens each, the mean of `iters` replays back to back (no host gaps), after two warm-up
        replays. inputs.fake_batch writes into the cache: only while no request holds blocks (start-up
        calibration, benchmarks)."""
        if ctx + 1 > self.max_model_len:
            raise ValueError(f"context {ctx} does not fit max_model_len {self.max_model_len}")
        host = prepare_inputs(fake_batch(bucket, ctx, self.block_size, self.num_kv_blocks), self.block_size)
        self._load(host, bucket, bucket)
        return 1e3 * replay_seconds(self._graph(path, bucket).graph, iters, warmup=2)
