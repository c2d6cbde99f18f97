"""Run a `splitserve` command (e.g. `bench pdmux ...`) with its engine steps watched. Recorded, on one clock
(seconds since the start), and written to $STALLS (JSON) at exit:
- each step longer than SLOW_MS (60), with the main thread's stack sampled while it ran and the device allocator
  calls it made;
- each gap between two tokens of one request longer than GAP_MS (100), with the engine's last 40 steps and
  prefill launches before it (steps that are all short before a long gap: the host was stuck outside a step);
- each garbage collection longer than GC_MS (20), anywhere in the process.
It pointed at the full collections behind the bench's rare 0.2-0.3 s gaps (docs/PD-MULTIPLEX.md, twelfth
session). NO_FREEZE=1 makes `freeze_startup_heap` freeze nothing (the A of an A/B).

    STALLS=out.json python3 scripts/bench_watchdog.py bench pdmux --shape qwen3-8b ...
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import os
import sys
import time
from collections import deque

import torch
from step_watch import GcLog, StackSampler, since_start

from splitserve.cli import main
from splitserve.engine import gc_heap
from splitserve.engine.core import EngineCore
from splitserve.engine.engine import LLMEngine
from splitserve.engine.request_state import RequestState

SLOW_MS, GAP_MS = float(os.environ.get("SLOW_MS", 60)), float(os.environ.get("GAP_MS", 100))


class Watch:
    def __init__(self):
        self.sampler = StackSampler(SLOW_MS)
        self.gcs = GcLog(float(os.environ.get("GC_MS", 20)))
        self.recent: deque[dict] = deque(maxlen=40)  # the last steps and prefill launches
        self.slow_steps: list[dict] = []
        self.long_gaps: list[dict] = []
        self.frozen = 0  # the most start-up objects frozen while a step ran (a module attribute: no list walk)

    def dump(self) -> None:
        with open(os.environ.get("STALLS", "stalls.json"), "w") as f:
            json.dump({"slow_steps": self.slow_steps, "long_gaps": self.long_gaps, **self.gcs.summary(),
                       "gc_frozen_objects": self.frozen}, f, indent=1)


watch = Watch()
step, launch_prefill, apply = LLMEngine.step, EngineCore._launch_prefill, RequestState.apply


@functools.wraps(step)
def timed_step(self):
    core = self.core
    if not isinstance(core, EngineCore):  # a core in another process: nothing to watch here
        return step(self)
    watch.frozen = max(watch.frozen, gc_heap.frozen_objects)
    allocs = torch.cuda.memory_stats().get("num_device_alloc", 0)
    t0 = time.perf_counter()
    watch.sampler.start_step()
    try:
        return step(self)
    finally:
        stacks = watch.sampler.end_step()
        ms = round((time.perf_counter() - t0) * 1e3, 1)
        lanes = getattr(core, "lanes", None)
        state = {"running": len(core.scheduler.running), "waiting": len(core.scheduler.waiting),
                 "busy": len(getattr(core.scheduler, "busy", ())), "decode_sm": getattr(lanes, "decode_sm", None),
                 "prefill_pending": getattr(core, "prefill_pending", None) is not None}
        watch.recent.append({"t": since_start(), "step_ms": ms, **state})
        if ms > SLOW_MS:
            watch.slow_steps.append({
                "t": since_start(), "step_ms": ms, **state, "stacks": stacks,
                "device_allocs": torch.cuda.memory_stats().get("num_device_alloc", 0) - allocs})


@functools.wraps(launch_prefill)
def noted_launch_prefill(self, batch, decode):
    watch.recent.append({"t": since_start(), "prefill_launch_tokens": sum(batch.num_new_tokens),
                         "prefill_rows": len(batch.seqs), "decode_rows": len(decode.seqs)})
    return launch_prefill(self, batch, decode)


@functools.wraps(apply)
def noted_apply(self, out, now):
    times = self.metrics.token_times
    last, k = (times[-1] if times else None), len(times)
    result = apply(self, out, now)
    if last is not None and len(times) > k and (now - last) * 1e3 > GAP_MS:
        watch.long_gaps.append({"t": since_start(), "gap_ms": round((now - last) * 1e3, 1),
                                "request": self.request_id, "prompt_len": self.num_prompt_tokens,
                                "output_index": k, "new_tokens": len(times) - k, "recent": list(watch.recent)})
    return result


if os.environ.get("NO_FREEZE"):
    gc.freeze = lambda: None
LLMEngine.step, EngineCore._launch_prefill, RequestState.apply = timed_step, noted_launch_prefill, noted_apply
atexit.register(watch.dump)
sys.argv = ["splitserve", *sys.argv[1:]]
main()
