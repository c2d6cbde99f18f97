"""Prefill ‖ decode on one GPU (issue 13): the lanes' streams, the SM split, its calibrated plan, and why.

The engine core (engine/core.py) runs a multiplexed step as two launches over one KV cache: a prefill batch
(prompt chunks, never sampling) and a decode batch (every row that samples, 1 token each). Here:
- `PDLanes.start_prefill` picks where a prefill batch runs: the prefill side of a green-context split of the
  GPU, chosen for the decode batch at hand. The prefill stream first waits for the work already enqueued on
  the decode stream (the blocks it is about to write may have been freed by a step still running there), then
  runs beside the decode steps that follow, for as many steps as it takes.
- The batch is enqueued a few layers at a time (`PrefillRun`, fed once per core step): a whole Qwen3-8B
  prefill enqueued at once filled the stream's launch queue, and the host blocked in that launch for up to
  0.95 s, every decode with it (H200, scripts/pdmux_stall_probe.py).
- While a prefill batch runs, decode steps replay CUDA graphs captured on the decode side of the same split
  (a graph keeps the partition it was captured on, GPU-FACTS.md), so they keep their pace on their SMs;
  with no prefill running they replay the plain graphs over the whole GPU.
- A prefill batch launched while no decode runs takes the whole GPU (an ordinary stream): there is no pace to
  keep; decode steps that start before it is done (its own prompts' first tokens) share the GPU with it.
- The split follows the load: at start-up each candidate decode partition is timed at a few batch sizes and
  two decode contexts while a prefill runs on the rest (the plan, cached as JSON like the decode plan); a
  prefill launch takes the fewest decode SMs that keep the decode step, read off the plan for the decode
  batch's size and mean context, within the target (`pd_itl_target_ms`, default DEFAULT_TARGET_FACTOR × the
  idle step there). A split holds for a whole prefill batch (no two splits ever overlap), so re-choosing per
  prefill batch is the hysteresis; a change is logged.
On CPU the lanes run one after the other (no streams; the same scheduler), which is what CI tests. On a GPU
without green contexts (old driver, MIG, no cuda-bindings) or without CUDA graphs (`enforce_eager`) the
mode is off and the requests run colocated with chunked prefill; one WARNING says why.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from splitserve.config import EngineConfig
from splitserve.pipeline.planner import Plan, bracket
from splitserve.worker.decode_graphs import PLAIN, DecodePath
from splitserve.worker.model_runner import LaunchedStep

logger = logging.getLogger("splitserve")

# Default decode-step target beside a prefill: this × the idle step at the same batch and context. A
# chunked-prefill stall costs decode 10-30 idle steps (docs/PD-MULTIPLEX.md); 2× keeps far below that while
# prefill keeps most of the SMs (Qwen3-8B on an H200: 32-64 decode SMs of 132).
DEFAULT_TARGET_FACTOR = 2.0
PREFILL_LAYERS_PER_PIECE = 4  # layers of a prefill batch enqueued at once (~60 kernels: far below a full queue)
CTX_POINTS = (1024, 4096)  # decode contexts the plan is measured at (the step is near linear in between)
# Calibration: fake prefills kept enqueued beside each timed decode replay. More do not help a small model whose
# prefill ends first: enqueuing dozens made the 0.6B's calibration take minutes (H200); such a time is marked.
PREFILLS_QUEUED = 3
PLAN_VERSION = 2  # 2: anchors × contexts (1: anchors at one context)


def partition_path(decode_sm: int) -> DecodePath:
    return DecodePath("partition", decode_sm)


@dataclass
class PDPlan(Plan):
    """Decode step times (ms) measured at batch anchors × contexts (planner.Plan, read the same way: piecewise
    linear in both): times_ms["plain"] alone on the whole GPU, times_ms["partition:N"] on N decode SMs while a
    prefill of `prefill_tokens` runs on the rest (splits: [decode SMs, prefill SMs], as the driver made them);
    `overlapped`: whether the prefill was still running when each timing ended."""
    prefill_tokens: int = 0
    overlapped: dict[str, list[list[bool]]] = field(default_factory=dict)
    VERSION: ClassVar[int] = PLAN_VERSION

    def decode_sms(self) -> list[int]:
        """The decode partitions measured, fewest SMs first."""
        return sorted(decode_sm for decode_sm, _ in self.splits.values())

    def _timed_beside(self, decode_sm: int, batch: float, ctx: float) -> bool:
        """Whether every cell the estimate at (batch, ctx) reads was timed beside a running prefill, on this
        partition and on every larger one (a larger partition's step is the shorter timing: where the prefill
        did not outlast that, a smaller one's mark would be down to the timing race)."""
        cells = [(i, j) for i in bracket(self.anchors, batch) for j in bracket(self.ctx_points, ctx)]
        larger = [partition_path(s).name for s in self.decode_sms() if s >= decode_sm]
        return all(self.overlapped[n][i][j] for n in larger if n in self.overlapped for i, j in cells)

    def choice(self, batch: float, ctx: float, target_ms: float | None,
               among: list[int] | None = None) -> tuple[int, float, bool]:
        """(decode SMs, target ms, met) for a decode batch of `batch` rows at mean context `ctx`: the fewest SMs
        (of `among`, default every partition measured) whose step stays within the target, else the most. A
        step read from a cell the prefill did not outlast is a lower bound, so it never counts as within."""
        target = target_ms if target_ms is not None else DEFAULT_TARGET_FACTOR * self.estimate(PLAIN.name, batch, ctx)
        sizes = sorted(among) if among is not None else self.decode_sms()
        for sm in sizes:
            if self._timed_beside(sm, batch, ctx) and self.estimate(partition_path(sm).name, batch, ctx) <= target:
                return sm, target, True
        return sizes[-1], target, False

    def grid_choices(self, target_ms: float | None, max_batch: int, max_ctx: int) -> set[int]:
        """The partitions chosen at some corner of the plan's cells, the grid extended to every batch and context
        the engine can run (1 row, 0 tokens, up to the largest). Keeping only these loses nothing wherever a step
        gets no slower as SMs are added: the most SMs a cell's corners need are enough inside it too."""
        batches = sorted({1, *self.anchors, max_batch})
        ctxs = sorted({0, *self.ctx_points, max_ctx})
        return {self.choice(b, c, target_ms)[0] for b in batches for c in ctxs}

    def _beside(self, name: str, i: int, j: int) -> bool:
        return name not in self.overlapped or self.overlapped[name][i][j]

    def _cell(self, name: str, i: int, j: int) -> str:
        return f"{self.times_ms[name][i][j]:.2f}" + ("" if self._beside(name, i, j) else "*")

    def table(self, target_ms: float | None = None) -> str:
        sizes = self.decode_sms()
        head = "batch | ctx | idle ms | " + " | ".join(f"{s} SMs" for s in sizes) + " | target ms | decode SMs"
        lines = [head, "-" * len(head)]
        for i, anchor in enumerate(self.anchors):
            for j, ctx in enumerate(self.ctx_points):
                sm, target, met = self.choice(anchor, ctx, target_ms)
                cells = " | ".join(self._cell(partition_path(s).name, i, j) for s in sizes)
                lines.append(f"{anchor} | {ctx} | {self.times_ms[PLAIN.name][i][j]:.2f} | {cells} | {target:.2f} | "
                             f"{sm}" + ("" if met else " (target missed: the most SMs)"))
        if not all(all(row) for rows in self.overlapped.values() for row in rows):  # see calibrate
            lines.append("* the prefill beside it ended before the timing did: beside a running prefill the step "
                         "may be longer")
        return "\n".join(lines)


class PrefillRun:
    """A prefill batch on its way through the device: its pieces (runner.launch_in_pieces: a few layers each),
    the events of the pieces enqueued and not yet seen done, and its LaunchedStep once the last is enqueued.
    `feed` keeps at most MAX_PIECES_IN_FLIGHT pieces queued (the prefill never starves while the core steps
    every few milliseconds, and no launch blocks the host on a full launch queue)."""

    MAX_PIECES_IN_FLIGHT = 2

    def __init__(self, batch, pieces: Iterator, stream: torch.cuda.Stream | None):
        self.batch, self.pieces, self.stream = batch, pieces, stream
        self.in_flight: deque = deque()
        self.step = None  # the LaunchedStep, once every piece is enqueued

    def feed(self, max_in_flight: int | float = MAX_PIECES_IN_FLIGHT) -> None:
        with torch.cuda.stream(self.stream):  # None: the current stream (CPU: nothing to choose)
            while self.step is None:
                while self.in_flight and (self.in_flight[0] is None or self.in_flight[0].query()):
                    self.in_flight.popleft()
                if len(self.in_flight) >= max_in_flight:
                    return
                piece = next(self.pieces)
                if isinstance(piece, LaunchedStep):
                    self.step = piece
                else:
                    self.in_flight.append(piece)

    def done(self) -> bool:
        return self.step is not None and (self.step.event is None or self.step.event.query())

    def finish(self) -> LaunchedStep:
        """Every piece enqueued (the caller then waits for the step: nothing else is left to run)."""
        self.feed(math.inf)
        return self.step


class PDLanes:
    """The multiplexed core's streams and split. `partitions` is empty on CPU (lanes run one after the other)."""

    def __init__(self, status: dict, partitions: dict | None = None, plan: PDPlan | None = None,
                 target_ms: float | None = None):
        self.status = status
        self.partitions = partitions or {}  # decode SMs -> green.SMPartition (memory_*: decode, compute_*: prefill)
        self.plan, self.target_ms = plan, target_ms
        self.decode_sm: int | None = None  # the split of the running prefill batch (None: none running)
        self.last_decode_sm: int | None = None
        self.prefill_started = 0.0
        self.whole_gpu_stream = torch.cuda.Stream() if self.partitions else None

    def choose_split(self, num_decode: int, mean_ctx: float) -> int:
        """Decode SMs for a prefill batch launched beside a decode batch of `num_decode` rows whose mean context
        is `mean_ctx` tokens (the KV read grows with it: a split that keeps pace at short contexts may not at
        long ones). Only the partitions kept at start-up are candidates."""
        if len(self.partitions) == 1 or self.plan is None:
            return next(iter(self.partitions))
        return self.plan.choice(num_decode, mean_ctx, self.target_ms, among=list(self.partitions))[0]

    def start_prefill(self, num_decode: int, mean_ctx: float,
                      prev_tokens: torch.Tensor | None) -> torch.cuda.Stream | None:
        """The stream of a prefill batch launched beside a decode batch of `num_decode` rows at mean context
        `mean_ctx` (None on CPU): the prefill side of the split chosen for it, or the whole GPU when no decode
        runs. It first waits for the work already enqueued on the decode stream (blocks it writes may have been
        freed by a step still running there)."""
        st = self.status
        st["prefill_launches"] += 1
        self.prefill_started = time.perf_counter()
        if not self.partitions:
            return None
        if num_decode == 0:  # nothing to keep pace with: the whole GPU (decode steps that start meanwhile share it)
            st["prefill_launches_whole_gpu"] += 1
            self.decode_sm, stream = None, self.whole_gpu_stream
        else:
            sm = self.choose_split(num_decode, mean_ctx)
            if sm != self.last_decode_sm:
                if self.last_decode_sm is not None:
                    st["split_switches"] += 1
                    logger.info("PD multiplexing: decode partition %d -> %d SMs (decode batch %d, mean context %d)",
                                self.last_decode_sm, sm, num_decode, mean_ctx)
                self.last_decode_sm = sm
            self.decode_sm = st["decode_sm"] = sm
            st["prefill_sm"] = self.partitions[sm].compute_sm  # the rest of the split: prefill's
            stream = self.partitions[sm].compute_stream
        stream.wait_stream(torch.cuda.current_stream())
        if prev_tokens is not None:
            prev_tokens.record_stream(stream)  # a recomputed placeholder is gathered from them on this stream
        return stream

    def is_done(self, run: PrefillRun) -> bool:
        return run.done()

    def prefill_done(self) -> None:
        self.status["prefill_lane_time_s"] += time.perf_counter() - self.prefill_started
        self.decode_sm = None

    def decode_path(self) -> DecodePath | None:
        """The graphs a decode step replays now: the decode partition's while a prefill runs, else plain."""
        return None if self.decode_sm is None else partition_path(self.decode_sm)

    def count_decode(self, prefill_running: bool) -> None:
        self.status["decode_steps_beside_prefill" if prefill_running else "decode_steps_alone"] += 1


def check_decode_sm(config: EngineConfig, device: torch.device) -> None:
    """pd_decode_sm against this GPU's SM count, before any memory is taken."""
    from splitserve.pipeline import green

    if not config.enable_pd_multiplex or config.pd_decode_sm is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).multi_processor_count
    if config.pd_decode_sm > total - green.SM_GRANULARITY:
        raise ValueError(f"pd_decode_sm = {config.pd_decode_sm} leaves under {green.SM_GRANULARITY} of the "
                         f"{total} SMs of this GPU for prefill")


def activation_pools(config: EngineConfig, device: torch.device) -> int:
    """Streams that may hold a prefill's activations at once: the decode stream, and with concurrent lanes each
    candidate split's prefill stream and the whole-GPU one (the caching allocator keeps a pool per stream, and a
    stream short of memory makes it free cached blocks, which waits for every stream: a decode stall)."""
    if not config.enable_pd_multiplex or device.type != "cuda" or config.enforce_eager:
        return 1
    total = torch.cuda.get_device_properties(device).multi_processor_count
    splits = 1 if config.pd_decode_sm else len(candidate_decode_sm(total))
    return 2 + splits


def candidate_decode_sm(total_sms: int) -> list[int]:
    """Decode partitions to calibrate: 3/16 to 3/4 of the GPU (24-96 of 132 SMs). A tight pd_itl_target_ms
    needs the large ones (decode on 96 SMs, prefill on 36); the decode pipeline's memory side stops at half."""
    from splitserve.pipeline import planner

    return planner.candidate_splits(total_sms, (0.1875, 0.25, 0.375, 0.5, 0.625, 0.75))


def _status(config: EngineConfig) -> dict:
    return {"requested": config.enable_pd_multiplex, "mode": "off", "concurrent": False, "reason": "not requested"}


def setup_pd_multiplex(runner, config: EngineConfig) -> tuple[PDLanes | None, dict]:
    """The lanes for an engine core, or None (mode off: not requested, or colocated as the fallback), and the
    mode's status. Says once, as a WARNING, when the mode does not run concurrently, and why."""
    from splitserve.pipeline import green

    status = _status(config)
    if not config.enable_pd_multiplex:
        return None, status
    status.update(decode_sm=config.pd_decode_sm, prefill_sm=None, itl_target_ms=config.pd_itl_target_ms,
                  prefill_launches=0, prefill_launches_whole_gpu=0, decode_steps_beside_prefill=0, decode_steps_alone=0,
                  decode_done_while_prefill_ran=0, split_switches=0, prefill_lane_time_s=0.0)
    device = runner.device
    if device.type == "cpu":
        status.update(mode="sequential", reason="CPU device: green contexts need a CUDA GPU")
        logger.warning("PD multiplexing requested but prefill and decode do not run concurrently: %s; the prefill "
                       "lane and the decode lane run one after the other (same scheduler)", status["reason"])
        return PDLanes(status), status
    ok, reason = green.capability(device)
    if ok and runner.graphs is None:
        ok, reason = False, "enforce_eager=True, and the decode partition runs only as CUDA graphs"
    if ok:
        total = torch.cuda.get_device_properties(device).multi_processor_count
        try:
            return _concurrent_lanes(runner, config, status, total), status
        except RuntimeError as e:  # the driver refused a partition or a capture: colocated still runs
            ok, reason = False, f"setting up the partitions failed: {e}"
    status.update(mode="colocated", reason=reason)
    logger.warning("PD multiplexing requested but unavailable: %s; the requests run colocated with chunked "
                   "prefill (max_num_batched_tokens=%d)", reason, config.max_num_batched_tokens)
    return None, status


def _concurrent_lanes(runner, config: EngineConfig, status: dict, total: int) -> PDLanes:
    from splitserve.pipeline import green

    graphs = runner.graphs
    sizes = [config.pd_decode_sm] if config.pd_decode_sm else candidate_decode_sm(total)
    t0 = time.perf_counter()
    mem0 = graphs.free_memory()
    partitions = {}
    for sm in sizes:
        part = green.split(runner.device, sm)
        partitions[part.memory_sm] = part  # the driver's real size (the group asked for: decode; the rest: prefill)
    for sm, part in partitions.items():
        for bucket in reversed(graphs.buckets):
            graphs.capture_on(partition_path(sm), bucket, part.memory_stream)
    plan, cached, plan_file = None, False, None
    if len(partitions) > 1:
        plan, cached, plan_file = _plan(runner, partitions, config.max_num_batched_tokens)
        used = plan.grid_choices(config.pd_itl_target_ms, graphs.buckets[-1], graphs.max_model_len - 1)
        for sm in [s for s in partitions if s not in used]:
            graphs.drop(partition_path(sm))
            del partitions[sm]
    torch.cuda.empty_cache()  # the calibration's and the dropped partitions' cached blocks
    lanes = PDLanes(status, partitions, plan, config.pd_itl_target_ms)
    warm_up(runner, partitions, [lanes.whole_gpu_stream] + [p.compute_stream for p in partitions.values()])
    status.update(mode="concurrent", concurrent=True,
                  reason="green-context partitions: prefill beside decode; decode on the whole GPU when no "
                         "prefill runs", candidate_decode_sm=sorted(int(s) for s in sizes),
                  decode_sm_used=sorted(partitions), setup_s=round(time.perf_counter() - t0, 2),
                  graph_memory_bytes=mem0 - graphs.free_memory(), plan_file=plan_file, plan_cached=cached,
                  plan=plan.table(config.pd_itl_target_ms) if plan else None,
                  default_target_factor=DEFAULT_TARGET_FACTOR)
    logger.info("PD multiplexing: decode partitions %s SMs (prefill: the rest)%s", sorted(partitions),
                "" if plan is None else f"; plan ({'cached' if cached else 'calibrated'}):\n{status['plan']}")
    return lanes


PINNED_BLOCKS_PER_CLASS = 16  # staging buffers of one class that may be in flight at once (a few per step)
PINNED_BYTES_PER_CLASS = 4 << 20  # ... but fewer of the large classes


def warm_up(runner, partitions: dict, prefill_streams: list[torch.cuda.Stream]) -> None:
    """Pay every first-time cost before serving, where it would otherwise stall a decode step behind the prefill
    pieces enqueued beside it. Each partition graph is replayed once (measured on an H200: a step with a graph's
    first replay took 26 ms at the median, 13 ms once replayed before; slow steps 14 -> 4 in 15 s at 9 req/s).
    The caching allocators are filled: cudaMalloc and cudaHostAlloc are implicit synchronisations (CUDA C++
    Programming Guide, "Implicit Synchronization"). Each prefill stream's pool (the allocator keeps one per stream;
    `activation_pools` reserved them) gets the largest prefill batch's activations, the decode stream's the
    largest decode step's, and the pinned pool a few blocks of every power-of-two class the per-step input
    and output copies use."""
    from splitserve.engine.scheduler import ScheduledBatch
    from splitserve.worker.inputs import fake_batch

    graphs = runner.graphs
    for sm in partitions:
        for bucket in graphs.buckets:
            graphs.time(partition_path(sm), bucket, 1, iters=1)
    cfg = runner.config
    tokens = min(cfg.max_num_batched_tokens, runner.max_model_len - 1)
    seq = fake_batch(1, 0, runner.block_size, runner.num_kv_blocks, num_new_tokens=tokens + 1, token_id=0).seqs[0]
    prefill = ScheduledBatch([seq], [tokens])  # all but the last token: the prefill lane's kind of batch
    for stream in prefill_streams:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in runner.launch_in_pieces(prefill, None, PREFILL_LAYERS_PER_PIECE):
                pass
        torch.cuda.current_stream().wait_stream(stream)
    runner.execute(fake_batch(cfg.max_num_seqs, 1, runner.block_size, runner.num_kv_blocks))
    # The decode step's one eager GEMM, lm_head, at every row count it can get: a row count cuBLAS had not run
    # before blocked the host in that call for as long as the prefill piece beside it ran.
    # Measured on an H200 (scripts/probe_first_gemm.py): 22-36 ms, about every 8th row count; never a second time.
    hidden = torch.zeros(cfg.max_num_seqs, runner.hf_config.hidden_size, dtype=runner.dtype, device=runner.device)
    with torch.no_grad():
        for rows in range(1, cfg.max_num_seqs + 1):
            runner.model.compute_logits(hidden[:rows])
    torch.cuda.synchronize(runner.device)
    # the largest staging copy: a prefill's int64 token inputs, or block tables of the most rows at full width
    largest = 8 * max(tokens, cfg.max_num_seqs * -(-runner.max_model_len // runner.block_size))
    pinned = [torch.empty(1 << k, dtype=torch.uint8, pin_memory=True) for k in range(9, largest.bit_length() + 1)
              for _ in range(max(2, min(PINNED_BLOCKS_PER_CLASS, PINNED_BYTES_PER_CLASS >> k)))]
    del pinned  # cached by the host allocator, class by class


def _plan(runner, partitions: dict, chunk: int) -> tuple[PDPlan, bool, str]:
    from splitserve.pipeline import planner

    graphs = runner.graphs
    anchors = [b for b in graphs.buckets if b in (1, 8, 32, 64, 128, 256, 512)] or [graphs.buckets[-1]]
    ctx_points = sorted({min(c, graphs.max_model_len - 1) for c in CTX_POINTS})
    tokens = min(chunk, graphs.max_model_len - 1)
    key = planner.plan_key(graphs, planner.model_shape(runner.hf_config), str(runner.dtype), sorted(partitions),
                           anchors, ctx_points)
    key.update(kind="pd-multiplex", prefill_tokens=tokens)
    path = planner.plan_cache_path(key, "pd-plan")
    plan = planner.read_plan(path, PDPlan, key)
    if plan is not None:
        return plan, True, path
    plan = calibrate(runner, partitions, anchors, ctx_points, tokens)
    plan.key = key
    planner.write_plan(path, plan)
    return plan, False, path


def calibrate(runner, partitions: dict, anchors: list[int], ctx_points: list[int], tokens: int,
              iters: int = 5) -> PDPlan:
    """Per anchor and context: the plain graph's step alone, and each partition's graph while fake prefills of
    `tokens` tokens run on the rest (topped up to PREFILLS_QUEUED before each timing; `overlapped` says whether they
    outlasted it). Start-up only: the fake batches write into the KV cache."""
    from splitserve.worker.inputs import fake_batch

    graphs = runner.graphs
    t0 = time.perf_counter()
    times = {PLAIN.name: [[graphs.time(PLAIN, a, c, iters) for c in ctx_points] for a in anchors]}
    overlapped, splits = {}, {}
    prefill = fake_batch(1, 0, runner.block_size, runner.num_kv_blocks, num_new_tokens=tokens, token_id=0)
    for sm, part in partitions.items():
        name = partition_path(sm).name
        times[name], overlapped[name], splits[name] = [], [], [sm, part.compute_sm]
        queued: deque[torch.cuda.Event] = deque()
        part.compute_stream.wait_stream(torch.cuda.current_stream())
        for anchor in anchors:
            row, seen = [], []
            for ctx in ctx_points:
                while queued and queued[0].query():
                    queued.popleft()
                with torch.cuda.stream(part.compute_stream):
                    while len(queued) < PREFILLS_QUEUED:
                        queued.append(runner.launch(prefill).event)
                row.append(graphs.time(partition_path(sm), anchor, ctx, iters))
                seen.append(not queued[-1].query())  # the prefill outlasted the timing
            times[name].append(row)
            overlapped[name].append(seen)
        torch.cuda.current_stream().wait_stream(part.compute_stream)
    torch.cuda.synchronize(runner.device)
    return PDPlan(list(anchors), list(ctx_points), times, splits, prefill_tokens=tokens, overlapped=overlapped,
                  calibration_s=time.perf_counter() - t0)
