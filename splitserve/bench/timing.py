"""The one timing helper of the benchmarks: wall time of a call that ends synchronized with the device."""

from __future__ import annotations

import time

import numpy as np
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[object, float]:
    """(fn's result, seconds): the device is synchronized before the clock starts and before it stops."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def median_time(fn, device: torch.device, iters: int, warmup: int = 0) -> float:
    """Median seconds of `iters` synchronized calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return float(np.median([timed(fn, device)[1] for _ in range(iters)]))


def graph_seconds_per_call(call, calls: int, replays: int, warmup: int = 2) -> float:
    """Device seconds per call of `call(i)`, i = 0 .. calls - 1, captured once as a CUDA graph and replayed `replays`
    times back to back (no host gaps) after `warmup` replays. Run `call` eagerly before: capture does not compile."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i)
    return replay_seconds(graph, replays, warmup) / calls


def replay_seconds(graph: torch.cuda.CUDAGraph, replays: int, warmup: int = 2) -> float:
    """Device seconds per replay of a captured graph: `replays` back to back (no host gaps) after `warmup`."""
    for _ in range(warmup):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / replays
