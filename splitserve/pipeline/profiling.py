"""Per-step decode records (`decode_pipeline_profiling=True`): path, split, step and stage times, overlap.

Step time comes from CUDA events around the graph replay. Inside a pipelined graph, external timing events
at every stage boundary (see pingpong.PingPong) time each stage on each replay. Overlap
efficiency is the share of the shorter stream's busy time that was hidden behind the other stream:
(memory busy + compute busy - span) / min(memory busy, compute busy); 1 is perfect overlap, 0 is none.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch


def stage_times(stage_events: list) -> dict:
    """Busy time per stream, the span from the first stage start to the last stage end, and overlap."""
    busy = {"memory": 0.0, "compute": 0.0}
    for kind, _, _, start, end in stage_events:
        busy[kind] += start.elapsed_time(end)
    span = stage_events[0][3].elapsed_time(stage_events[-1][4])
    shorter = min(busy.values())
    overlap = (busy["memory"] + busy["compute"] - span) / shorter if shorter > 0 else 0.0
    return {"memory_ms": busy["memory"], "compute_ms": busy["compute"], "stages_span_ms": span,
            "overlap_efficiency": float(np.clip(overlap, 0.0, 1.0))}


class StepProfiler:
    """Keeps the last `maxlen` decode-step records and running totals per path."""

    def __init__(self, maxlen: int = 4096):
        self.records: deque = deque(maxlen=maxlen)
        self.totals: dict[str, dict] = {}
        self._started = None
        self._pending: deque = deque()  # launched, not yet collected: with async scheduling up to two

    def start(self) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self._started = (start, end)

    def stop(self, **step) -> None:
        """After the replay was launched; the record is read in `collect`, once the step has synced."""
        start, end = self._started
        end.record()
        self._pending.append((start, end, step))

    def collect(self) -> None:
        """The oldest launched record: the runner calls this once per profiled step, as it resolves, in order."""
        if not self._pending:
            return
        start, end, step = self._pending.popleft()
        stages = step.pop("stage_events", None)
        record = dict(step, step_ms=start.elapsed_time(end))
        if stages:
            record.update(stage_times(stages))
        self.records.append(record)
        total = self.totals.setdefault(record["path"], {"steps": 0, "step_ms": 0.0, "overlap_efficiency": 0.0})
        total["steps"] += 1
        total["step_ms"] += record["step_ms"]
        total["overlap_efficiency"] += record.get("overlap_efficiency", 0.0)

    def summary(self) -> dict:
        """Per path: steps, mean step time, mean overlap efficiency (pipelined paths)."""
        out = {}
        for path, t in self.totals.items():
            out[path] = {"steps": t["steps"], "mean_step_ms": t["step_ms"] / t["steps"]}
            if path != "plain":
                out[path]["mean_overlap_efficiency"] = t["overlap_efficiency"] / t["steps"]
        return out
