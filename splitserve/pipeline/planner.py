"""Decode planner: for each batch, the fastest decode path — measured, never assumed — and M3 rebalancing.

Paths (worker.decode_graphs.DecodePath) are the plain CUDA graph and the micro-batch pipeline on one SM
split (memory | compute partition, and how the batch is cut into two micro-batches). A plan holds step
times measured at anchor batch sizes (the buckets that have pipelined graphs) and a few context lengths.
`DecodePlanner.choose` estimates every path for the batch at hand by interpolating the plan (piecewise
linear in context length and in batch size, since attention cost grows linearly with the KV read) and
picks the fastest. As the batch's contexts grow or shrink the best split moves (attention's share of the
step grows with context); the planner follows it, but keeps the current path while it is within
`hysteresis` of the best, so a batch sitting on a boundary does not flap between graphs.

The splitting of work itself lives in pingpong.py, the partitions in green.py; `build_planner` joins
them to the decode graphs: capture, calibrate, cache the plan as JSON, print it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np

from splitserve.worker.decode_graphs import PLAIN, DecodePath, pipeline_path

logger = logging.getLogger("splitserve")

PLAN_VERSION = 2  # 2: the compute/memory stages of issue 14 (plans of the attention/FFN split are stale)
LOSING_MARGIN = 0.10  # a pipelined anchor "loses" when every split is this much slower than plain everywhere


# Memory-partition sizes worth calibrating: 3/16 to half of the GPU (24-64 of 132 SMs). The memory stages
# (paged attention) only stream the KV cache, and the decode kernel kept 3.45 TB/s of HBM on 48 SMs of an
# H200; every GEMM runs on the rest, so the memory side should be as small as keeps its bandwidth.
MEMORY_FRACTIONS = (0.1875, 0.25, 0.3125, 0.375, 0.5)


def candidate_splits(total_sms: int, fractions: tuple[float, ...] = MEMORY_FRACTIONS,
                     granularity: int = 8) -> list[int]:
    """Partition sizes at these fractions of the SMs, on the driver's granularity, leaving some for the rest."""
    sizes = {round(total_sms * f / granularity) * granularity for f in fractions}
    return sorted(s for s in sizes if granularity <= s <= total_sms - granularity)


def anchor_buckets(graph_buckets: list[int], smallest: int = 32) -> list[int]:
    """Batch buckets that get pipelined graphs: powers of two from `smallest`, every multiple of 128 above
    256, and the largest bucket. Bounding the grid bounds capture time and graph memory; the planner
    interpolates plain step times between anchors."""
    top = max(graph_buckets)
    return [b for b in graph_buckets
            if b >= smallest and ((b & (b - 1)) == 0 or (b > 256 and b % 128 == 0) or b == top)]


def bracket(xs: list[int], x: float) -> list[int]:
    """The indices of the points `_interp` reads for x: the two around it, or the last two / first two past
    the ends."""
    if len(xs) == 1:
        return [0]
    i = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
    return [i, i + 1]


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys); linear extrapolation past the ends; never below a tenth of the
    smallest measured value."""
    if len(xs) == 1:
        return ys[0]
    i, _ = bracket(xs, x)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.1 * min(ys))


@dataclass
class Plan:
    """Measured decode step times: times_ms[path name][i][j] at batch anchors[i], context ctx_points[j]."""
    anchors: list[int]
    ctx_points: list[int]
    times_ms: dict[str, list[list[float | None]]]
    splits: dict[str, list[int]] = field(default_factory=dict)  # path -> [memory SMs, compute SMs] (real)
    key: dict = field(default_factory=dict)  # what the plan was measured on (cache key)
    calibration_s: float = 0.0
    VERSION: ClassVar[int] = PLAN_VERSION

    def has(self, path: str, anchor: int) -> bool:
        if path not in self.times_ms or anchor not in self.anchors:
            return False
        return all(t is not None for t in self.times_ms[path][self.anchors.index(anchor)])

    def estimate(self, path: str, batch: int, ctx: float) -> float:
        """Step time of `path` replaying bucket `batch` at mean context `ctx`, in ms."""
        rows = [(a, r) for a, r in zip(self.anchors, self.times_ms[path]) if all(t is not None for t in r)]
        per_anchor = [_interp(self.ctx_points, r, ctx) for _, r in rows]
        return _interp([a for a, _ in rows], per_anchor, batch)

    def path(self, name: str) -> DecodePath:
        path = DecodePath.parse(name)
        split = self.splits.get(name)
        return pipeline_path(*split, path.first_fraction) if split else path

    def best_at(self, anchor: int, ctx: float) -> str:
        paths = [p for p in self.times_ms if self.has(p, anchor)]
        return min(paths, key=lambda p: self.estimate(p, anchor, ctx))

    def table(self) -> str:
        """The plan as text: per anchor and context, the fastest path and its speed-up over plain."""
        head = "batch \\ ctx | " + " | ".join(str(c) for c in self.ctx_points)
        lines = [head, "-" * len(head)]
        for anchor in self.anchors:
            cells = []
            for ctx in self.ctx_points:
                best = self.best_at(anchor, ctx)
                speedup = self.estimate(PLAIN.name, anchor, ctx) / self.estimate(best, anchor, ctx)
                cells.append(f"{best} {speedup:.2f}x" if best != PLAIN.name else "plain")
            lines.append(f"{anchor} | " + " | ".join(cells))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"version": self.VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        data = dict(data)
        if data.pop("version", None) != cls.VERSION:
            raise ValueError("plan written by another planner version")
        return cls(**data)


class DecodePlanner:
    """Chooses the decode path per step from a plan, with hysteresis (M3)."""

    def __init__(self, plan: Plan, hysteresis: float = 0.03):
        self.plan = plan
        self.hysteresis = hysteresis
        self.paths = {name: plan.path(name) for name in plan.times_ms}
        self.current: DecodePath | None = None  # the path of the last step (hysteresis keeps it while close)
        self.num_switches = 0
        self.steps = Counter()

    def candidates(self, num_seqs: int, plain_bucket: int, ctx: float) -> dict[DecodePath, tuple[float, int]]:
        """path -> (estimated ms, bucket it replays). Pipelined paths replay the smallest anchor that fits."""
        plan = self.plan
        fits = [a for a in plan.anchors if a >= num_seqs]
        out = {}
        if fits and plain_bucket >= min(plan.anchors):
            for name, path in self.paths.items():
                if path != PLAIN and plan.has(name, fits[0]):
                    out[path] = (plan.estimate(name, fits[0], ctx), fits[0])
        # with no alternative, plain needs no estimate (and small buckets have none: below the anchors)
        out[PLAIN] = (plan.estimate(PLAIN.name, plain_bucket, ctx) if out else 0.0, plain_bucket)
        return out

    def choose(self, num_seqs: int, plain_bucket: int, ctx: float) -> tuple[DecodePath, int]:
        """(path, bucket) for a decode step of `num_seqs` sequences with mean context `ctx`."""
        options = self.candidates(num_seqs, plain_bucket, ctx)
        path = min(options, key=lambda p: options[p][0])
        current = options.get(self.current)
        if current is not None and current[0] <= (1 + self.hysteresis) * options[path][0]:
            path = self.current
        if path != self.current:
            self.num_switches += self.current is not None
            self.current = path
        self.steps[path.name] += 1
        return path, options[path][1]

    def used_graphs(self) -> set[tuple[DecodePath, int]]:
        """Pipelined (path, anchor) graphs the plan can choose (best, or within the hysteresis of it, at
        some calibrated context): the others need not be kept."""
        plan, keep = self.plan, set()
        for anchor in plan.anchors:
            for ctx in plan.ctx_points:
                best = plan.estimate(plan.best_at(anchor, ctx), anchor, ctx)
                for name, path in self.paths.items():
                    if path != PLAIN and plan.has(name, anchor) and \
                            plan.estimate(name, anchor, ctx) <= (1 + self.hysteresis) * best:
                        keep.add((path, anchor))
        return keep

    def summary(self) -> dict:
        return {"steps_by_path": dict(self.steps), "current": self.current and self.current.name,
                "switches": self.num_switches, "hysteresis": self.hysteresis}


# ---- building a planner on the decode graphs (GPU) ----

def model_shape(hf_config) -> dict:
    """The model fields a measured plan depends on (random weights of a shape time like real ones)."""
    return {k: getattr(hf_config, k, None) for k in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size")}


def plan_key(graphs, model_shape: dict, dtype: str, splits: list[str], anchors: list[int],
             ctx_points: list[int]) -> dict:
    """Everything a measured plan depends on."""
    import torch
    import triton

    from splitserve import __version__

    props = torch.cuda.get_device_properties(graphs.device)
    return {"model": model_shape, "dtype": dtype, "gpu": props.name, "sms": props.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "splitserve": __version__, "block_size": graphs.block_size, "splits": splits, "anchors": anchors,
            "ctx_points": ctx_points, "max_model_len": graphs.max_model_len}


def plan_cache_path(key: dict, prefix: str = "decode-plan") -> str:
    from splitserve.models.loader import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), "plans", f"{prefix}-{digest}.json")


def read_plan(path: str, cls: type[Plan], key: dict) -> Plan | None:
    """The plan cached at `path`, if this version of `cls` measured it on `key`; else None (said if unreadable)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            plan = cls.from_json(json.load(f))
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
        logger.warning("plan cache %s not used (%s); calibrating again", path, e)
        return None
    return plan if plan.key == key else None


def write_plan(path: str, plan: Plan) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(plan.to_json(), f, indent=1)
    os.replace(path + ".tmp", path)


def pingpong_on(path: DecodePath, partition, profiling: bool):
    """The stage schedule of `path`'s pipelined graph on `partition` (pipeline.green.SMPartition)."""
    from splitserve.pipeline.pingpong import PingPong, StageStreams

    return PingPong(path.microbatches, StageStreams(partition.memory_stream, partition.compute_stream),
                    [] if profiling else None)


def calibrate(graphs, partitions: dict[DecodePath, object], anchors: list[int], ctx_points: list[int],
              iters: int = 5) -> Plan:
    """Capture and time every path at every anchor (largest first) and context point. Pipelined capture
    stops early once two anchors in a row lose everywhere by LOSING_MARGIN: smaller batches only lose
    more (each micro-batch reads all the weights again), so their graphs are not worth their memory."""
    t0 = time.perf_counter()
    times: dict[str, list] = {PLAIN.name: [], **{p.name: [] for p in partitions}}
    losing_streak = 0
    for anchor in sorted(anchors, reverse=True):
        plain = [graphs.time(PLAIN, anchor, c, iters) for c in ctx_points]
        times[PLAIN.name].insert(0, plain)
        lost = True
        for path, partition in partitions.items():
            row = [None] * len(ctx_points)
            if losing_streak < 2:
                if (path, anchor) not in graphs.pipelined:
                    graphs.capture_pipelined(path, anchor, pingpong_on(path, partition, graphs.profiler is not None))
                row = [graphs.time(path, anchor, c, iters) for c in ctx_points]
                lost = lost and all(t > (1 + LOSING_MARGIN) * p for t, p in zip(row, plain))
            times[path.name].insert(0, row)
        losing_streak = losing_streak + 1 if lost else 0
    splits = {p.name: [part.memory_sm, part.compute_sm] for p, part in partitions.items()}
    return Plan(sorted(anchors), list(ctx_points), times, splits, calibration_s=time.perf_counter() - t0)


def build_planner(graphs, partitions: dict[DecodePath, object], model_shape: dict, dtype: str,
                  hysteresis: float = 0.03) -> tuple[DecodePlanner, dict]:
    """Pipelined graphs and a plan (from the JSON cache, or calibrated and cached) on the given partitions,
    and a report. Only graphs the plan can choose are kept."""
    anchors = anchor_buckets(graphs.buckets)
    max_ctx = graphs.max_model_len - 1
    ctx_points = sorted({min(c, max_ctx) for c in (256, 1024, 4096)})
    key = plan_key(graphs, model_shape, dtype, sorted(p.name for p in partitions), anchors, ctx_points)
    path = plan_cache_path(key)
    t0 = time.perf_counter()
    mem0 = graphs.free_memory()
    plan = read_plan(path, Plan, key)
    cached = plan is not None
    if plan is None:
        plan = calibrate(graphs, partitions, anchors, ctx_points)
        plan.key = key
        write_plan(path, plan)
    planner = DecodePlanner(plan, hysteresis)
    keep = planner.used_graphs()
    graphs.keep_pipelined(keep)
    for graph_path, anchor in sorted(keep, key=lambda k: (k[0].name, k[1])):
        if (graph_path, anchor) not in graphs.pipelined:  # cached plan: capture only what it uses
            graphs.capture_pipelined(graph_path, anchor,
                                     pingpong_on(graph_path, partitions[graph_path], graphs.profiler is not None))
    report = {"plan_file": path, "plan_cached": cached, "calibration_s": round(plan.calibration_s, 2),
              "pipeline_graphs": sorted(f"{p.name}@{a}" for p, a in keep),
              "pipeline_graph_time_s": round(time.perf_counter() - t0, 2),
              "pipeline_graph_memory_bytes": mem0 - graphs.free_memory(),
              "candidate_splits": plan.splits, "plan": plan.table()}
    return planner, report
