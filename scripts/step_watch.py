"""Shared by the stall scripts (pdmux_stall_probe.py, bench_watchdog.py): where the host is while an engine step
runs long, and how long the garbage collector's passes take. Times are seconds on one clock, `since_start()`."""

from __future__ import annotations

import gc
import sys
import threading
import time
import traceback

START = time.perf_counter()


def since_start() -> float:
    return round(time.perf_counter() - START, 3)


class StackSampler:
    """A thread that samples the main thread's stack while a step has run past `slow_ms` (every 50 ms, at most 8
    samples a step): where the host is stuck, not only which timed part it was in."""

    def __init__(self, slow_ms: float):
        self.slow_s, self.main_id = slow_ms / 1e3, threading.main_thread().ident
        self.since: float | None = None
        self.stacks: list[list[str]] = []
        threading.Thread(target=self._run, daemon=True).start()

    def start_step(self) -> None:
        self.stacks = []
        self.since = time.perf_counter()

    def end_step(self) -> list[list[str]]:
        self.since = None
        return self.stacks

    def _run(self) -> None:
        while True:
            time.sleep(0.01)
            since = self.since
            if since is not None and time.perf_counter() - since > self.slow_s and len(self.stacks) < 8:
                frames = traceback.extract_stack(sys._current_frames()[self.main_id])[-16:]
                self.stacks.append([f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in frames])
                time.sleep(0.04)


class GcLog:
    """Every garbage collection in the process (in a step or not): the total time, the count per generation,
    and each one over `long_ms` with its time."""

    def __init__(self, long_ms: float = 20.0):
        self.long_ms, self.total_ms, self.counts, self.long = long_ms, 0.0, [0, 0, 0], []
        self._start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        ms = (time.perf_counter() - self._start) * 1e3
        self.total_ms += ms
        self.counts[info["generation"]] += 1
        if ms > self.long_ms:
            self.long.append({"t": since_start(), "ms": round(ms, 1), **info})

    def summary(self) -> dict:
        return {"gc_ms": round(self.total_ms, 1), "gc_collections": self.counts, "long_gcs": self.long}
