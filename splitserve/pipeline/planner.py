"""Decode planner: for each batch, the fastest decode path — measured, never assumed — and M3 rebalancing.

Paths are the plain CUDA graph ("plain") and the micro-batch pipeline on one SM split
("pipeline:<attention SMs>"). A plan holds step times measured at anchor batch sizes (the buckets that
have pipelined graphs) and a few context lengths. `DecodePlanner.choose` estimates every path for the
batch at hand by interpolating the plan (piecewise linear in context length and in batch size, since
attention cost grows linearly with the KV read) and picks the fastest. As the batch's contexts grow or
shrink the best split moves (attention's share of the step grows with context); the planner follows it,
but keeps the current path while it is within `hysteresis` of the best, so a batch sitting on a boundary
does not flap between graphs.

The splitting of work itself lives in pingpong.py, the partitions in green.py; `build_planner` joins
them to the model runner: capture, calibrate, cache the plan as JSON, print it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

logger = logging.getLogger("splitserve")

PLAIN = "plain"
PLAN_VERSION = 1
LOSING_MARGIN = 0.10  # a pipelined anchor "loses" when every split is this much slower than plain everywhere


def pipeline_path(attention_sm: int) -> str:
    return f"pipeline:{attention_sm}"


def path_attention_sm(path: str) -> int | None:
    return None if path == PLAIN else int(path.split(":")[1])


def candidate_splits(total_sms: int, granularity: int = 8) -> list[int]:
    """Attention-partition sizes worth calibrating: a quarter to five eighths of the GPU (attention is the
    memory-bound stage; it needs many SMs to saturate HBM, the FFN needs the rest for its GEMMs)."""
    sizes = {round(total_sms * f / granularity) * granularity for f in (0.25, 0.375, 0.5, 0.625)}
    return sorted(s for s in sizes if granularity <= s <= total_sms - granularity)


def anchor_buckets(graph_buckets: list[int], smallest: int = 32) -> list[int]:
    """Batch buckets that get pipelined graphs: powers of two from `smallest`, every multiple of 128 above
    256, and the largest bucket. Bounding the grid bounds capture time and graph memory; the planner
    interpolates plain step times between anchors."""
    top = max(graph_buckets)
    return [b for b in graph_buckets
            if b >= smallest and ((b & (b - 1)) == 0 or (b > 256 and b % 128 == 0) or b == top)]


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys); linear extrapolation past the ends; never below a tenth of the
    smallest measured value."""
    if len(xs) == 1:
        return ys[0]
    i = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.1 * min(ys))


@dataclass
class Plan:
    """Measured decode step times: times_ms[path][i][j] at batch anchors[i], context ctx_points[j]."""
    anchors: list[int]
    ctx_points: list[int]
    times_ms: dict[str, list[list[float | None]]]
    splits: dict[str, list[int]] = field(default_factory=dict)  # path -> [attention SMs, FFN SMs] (real)
    key: dict = field(default_factory=dict)  # what the plan was measured on (cache key)
    calibration_s: float = 0.0

    def has(self, path: str, anchor: int) -> bool:
        if path not in self.times_ms or anchor not in self.anchors:
            return False
        return all(t is not None for t in self.times_ms[path][self.anchors.index(anchor)])

    def estimate(self, path: str, batch: int, ctx: float) -> float:
        """Step time of `path` replaying bucket `batch` at mean context `ctx`, in ms."""
        rows = [(a, r) for a, r in zip(self.anchors, self.times_ms[path]) if all(t is not None for t in r)]
        per_anchor = [_interp(self.ctx_points, r, ctx) for _, r in rows]
        return _interp([a for a, _ in rows], per_anchor, batch)

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
                speedup = self.estimate(PLAIN, anchor, ctx) / self.estimate(best, anchor, ctx)
                cells.append(f"{best} {speedup:.2f}x" if best != PLAIN else "plain")
            lines.append(f"{anchor} | " + " | ".join(cells))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"version": PLAN_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        data = dict(data)
        if data.pop("version", None) != PLAN_VERSION:
            raise ValueError("plan written by another planner version")
        return cls(**data)


class DecodePlanner:
    """Chooses the decode path per step from a plan, with hysteresis (M3)."""

    def __init__(self, plan: Plan, hysteresis: float = 0.03):
        self.plan = plan
        self.hysteresis = hysteresis
        self.current: str | None = None  # the path of the last step (hysteresis keeps it while close)
        self.num_switches = 0
        self.steps = Counter()

    def candidates(self, num_seqs: int, plain_bucket: int, ctx: float) -> dict[str, tuple[float, int]]:
        """path -> (estimated ms, bucket it replays). Pipelined paths replay the smallest anchor that fits."""
        plan = self.plan
        fits = [a for a in plan.anchors if a >= num_seqs]
        out = {}
        if fits and plain_bucket >= min(plan.anchors):
            for path in plan.times_ms:
                if path != PLAIN and plan.has(path, fits[0]):
                    out[path] = (plan.estimate(path, fits[0], ctx), fits[0])
        # with no alternative, plain needs no estimate (and small buckets have none: below the anchors)
        out[PLAIN] = (plan.estimate(PLAIN, plain_bucket, ctx) if out else 0.0, plain_bucket)
        return out

    def choose(self, num_seqs: int, plain_bucket: int, ctx: float) -> tuple[str, int]:
        """(path, bucket) for a decode step of `num_seqs` sequences with mean context `ctx`."""
        options = self.candidates(num_seqs, plain_bucket, ctx)
        path = min(options, key=lambda p: options[p][0])
        current = options.get(self.current)
        if current is not None and current[0] <= (1 + self.hysteresis) * options[path][0]:
            path = self.current
        if path != self.current:
            self.num_switches += self.current is not None
            self.current = path
        self.steps[path] += 1
        return path, options[path][1]

    def used_graphs(self) -> set[tuple[str, int]]:
        """Pipelined (path, anchor) graphs the plan can choose (best, or within the hysteresis of it, at
        some calibrated context): the others need not be kept."""
        plan, keep = self.plan, set()
        for anchor in plan.anchors:
            for ctx in plan.ctx_points:
                best = plan.estimate(plan.best_at(anchor, ctx), anchor, ctx)
                for path in plan.times_ms:
                    if path != PLAIN and plan.has(path, anchor) and \
                            plan.estimate(path, anchor, ctx) <= (1 + self.hysteresis) * best:
                        keep.add((path, anchor))
        return keep

    def summary(self) -> dict:
        return {"steps_by_path": dict(self.steps), "current": self.current, "switches": self.num_switches,
                "hysteresis": self.hysteresis}


# ---- building a planner on a model runner (GPU) ----

def plan_key(runner, splits: list[int], anchors: list[int], ctx_points: list[int]) -> dict:
    """Everything a measured plan depends on."""
    import torch
    import triton

    from splitserve import __version__

    cfg = runner.hf_config
    props = torch.cuda.get_device_properties(runner.device)
    return {"model": {k: getattr(cfg, k, None) for k in (
                "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size")},
            "dtype": str(runner.dtype), "gpu": props.name, "sms": props.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "splitserve": __version__, "block_size": runner.block_size, "splits": splits, "anchors": anchors,
            "ctx_points": ctx_points, "max_model_len": runner.config.max_model_len}


def plan_cache_path(key: dict) -> str:
    from splitserve.models.loader import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), "plans", f"decode-plan-{digest}.json")


def calibrate(runner, partitions: dict[str, object], anchors: list[int], ctx_points: list[int],
              iters: int = 5) -> Plan:
    """Capture and time every path at every anchor (largest first) and context point. Pipelined capture
    stops early once two anchors in a row lose everywhere by LOSING_MARGIN: smaller batches only lose
    more (each micro-batch reads all the weights again), so their graphs are not worth their memory."""
    t0 = time.perf_counter()
    times: dict[str, list] = {PLAIN: [], **{p: [] for p in partitions}}
    losing_streak = 0
    for anchor in sorted(anchors, reverse=True):
        times[PLAIN].insert(0, [runner.time_decode(PLAIN, anchor, c, iters) for c in ctx_points])
        for path, partition in partitions.items():
            row = [None] * len(ctx_points)
            if losing_streak < 2:
                if (path, anchor) not in runner.pipeline_graphs:
                    runner.capture_pipeline_graph(path, partition, anchor)
                row = [runner.time_decode(path, anchor, c, iters) for c in ctx_points]
            times[path].insert(0, row)
        plain = times[PLAIN][0]
        lost = all(r[0] is None or all(t > (1 + LOSING_MARGIN) * p for t, p in zip(r, plain))
                   for path, r in ((p, times[p][0]) for p in partitions))
        losing_streak = losing_streak + 1 if lost else 0
    splits = {p: [part.attention_sm, part.ffn_sm] for p, part in partitions.items()}
    return Plan(sorted(anchors), list(ctx_points), times, splits, calibration_s=time.perf_counter() - t0)


def build_planner(runner, config, attention_sms: list[int], hysteresis: float = 0.03) -> tuple[DecodePlanner, dict]:
    """Partitions, pipelined graphs, a plan (from the JSON cache, or calibrated and cached), and a report.
    Only graphs the plan can choose are kept."""
    from splitserve.pipeline import green

    anchors = anchor_buckets(runner.graph_buckets())
    max_ctx = config.max_model_len - 1
    ctx_points = sorted({min(c, max_ctx) for c in (256, 1024, 4096)})
    partitions = {}
    for sm in attention_sms:
        partition = green.split(runner.device, sm)
        partitions[pipeline_path(partition.attention_sm)] = partition
    key = plan_key(runner, sorted(p.attention_sm for p in partitions.values()), anchors, ctx_points)
    path = plan_cache_path(key)
    t0 = time.perf_counter()
    mem0 = runner.free_device_memory()
    plan, cached = None, False
    if os.path.exists(path):
        try:
            with open(path) as f:
                plan = Plan.from_json(json.load(f))
            cached = plan.key == key
        except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
            logger.warning("decode plan cache %s unreadable (%s); calibrating again", path, e)
        if not cached:
            plan = None
    if plan is None:
        plan = calibrate(runner, partitions, anchors, ctx_points)
        plan.key = key
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(plan.to_json(), f, indent=1)
        os.replace(path + ".tmp", path)
    planner = DecodePlanner(plan, hysteresis)
    keep = planner.used_graphs()
    runner.drop_pipeline_graphs(keep)
    for graph_path, anchor in sorted(keep):
        if (graph_path, anchor) not in runner.pipeline_graphs:  # cached plan: capture only what it uses
            runner.capture_pipeline_graph(graph_path, partitions[graph_path], anchor)
    report = {"plan_file": path, "plan_cached": cached, "calibration_s": round(plan.calibration_s, 2),
              "pipeline_graphs": sorted(f"{p}@{a}" for p, a in keep),
              "pipeline_graph_time_s": round(time.perf_counter() - t0, 2),
              "pipeline_graph_memory_bytes": mem0 - runner.free_device_memory(),
              "candidate_splits": plan.splits, "plan": plan.table()}
    runner.sm_partitions = {p: partitions[p] for p, _ in keep}  # keep the green contexts alive
    return planner, report
