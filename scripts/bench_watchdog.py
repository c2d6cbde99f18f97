"""Run a `splitserve` command (e.g. `bench pdmux ...`) with every engine step timed: each step longer than
SLOW_MS gets the main thread's stack sampled while it runs (where the host is stuck), the garbage collector's
time in it, and the allocator calls it made. Every output gap over GAP_MS of one request is recorded too, with
the engine's last steps and prefill launches before it (a gap without a slow step: the request was not
scheduled), and every garbage collection over 20 ms anywhere in the process. Written to $STALLS (JSON) at exit.
Found the 0.2-0.3 s collections behind the bench's rare long gaps (docs/PD-MULTIPLEX.md, twelfth session).
NO_FREEZE=1 makes `freeze_startup_heap` freeze nothing (the A of an A/B).

    STALLS=out.json python3 scripts/bench_watchdog.py bench pdmux --shape qwen3-8b ...
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import os
import sys
import threading
import time
import traceback
from collections import deque

import torch

from splitserve.cli import main
from splitserve.engine import gc_heap
from splitserve.engine.engine import LLMEngine
from splitserve.engine.request_state import RequestState

SLOW_MS, GAP_MS = float(os.environ.get("SLOW_MS", 60)), float(os.environ.get("GAP_MS", 100))
main_id, running_since, stacks, slow, gc_ms = threading.main_thread().ident, [None], [], [], [0.0]
recent, gaps, patched = deque(maxlen=40), [], [None]  # the last steps and prefill launches; long gaps; id of
# the core whose prefill launches are noted (an id, not the core: a reference would keep its KV cache alive)
gc_start, gc_counts, long_gcs = [0.0], [0, 0, 0], []  # collections per generation; those over 20 ms
frozen = [0]  # the most start-up objects frozen while a step ran


def on_gc(phase, info):
    if phase == "start":
        gc_start[0] = time.perf_counter()
    else:
        ms = (time.perf_counter() - gc_start[0]) * 1e3
        gc_ms[0] += ms
        gc_counts[info["generation"]] += 1
        if ms > 20:
            long_gcs.append({"t": round(time.time() % 1000, 3), "ms": round(ms, 1), **info})


def watchdog():
    while True:
        time.sleep(0.01)
        since = running_since[0]
        if since is not None and (time.perf_counter() - since) * 1e3 > SLOW_MS and len(stacks) < 8:
            frames = traceback.extract_stack(sys._current_frames()[main_id])[-16:]
            stacks.append([f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in frames])
            time.sleep(0.04)


step = LLMEngine.step


@functools.wraps(step)
def timed_step(self):
    stacks.clear()
    frozen[0] = max(frozen[0], gc_heap.frozen_objects)  # a module attribute (gc.get_freeze_count walks the list)
    gc_before, dev_before = gc_ms[0], torch.cuda.memory_stats().get("num_device_alloc", 0)
    t0 = time.perf_counter()
    running_since[0] = t0
    core = self.core
    if patched[0] != id(core):  # a new engine (the bench builds one per setup)
        patched[0] = id(core)
        if hasattr(core, "_launch_prefill"):
            launch = core._launch_prefill

            def noted_launch(batch, decode):
                recent.append({"t": round(time.time() % 1000, 3), "prefill_launch_tokens": sum(batch.num_new_tokens),
                               "prefill_rows": len(batch.seqs), "decode_rows": len(decode.seqs)})
                return launch(batch, decode)
            core._launch_prefill = noted_launch
    try:
        return step(self)
    finally:
        running_since[0] = None
        ms = (time.perf_counter() - t0) * 1e3
        lanes = getattr(core, "lanes", None)
        recent.append({"t": round(time.time() % 1000, 3), "step_ms": round(ms, 1),
                       "running": len(core.scheduler.running), "busy": len(getattr(core.scheduler, "busy", ())),
                       "prefill_pending": getattr(core, "prefill_pending", None) is not None,
                       "decode_sm": getattr(lanes, "decode_sm", None)})
        if ms > SLOW_MS:
            core = self.core
            lanes = getattr(core, "lanes", None)
            slow.append({"wall": time.strftime("%H:%M:%S"), "step_ms": round(ms, 1),
                         "gc_ms": round(gc_ms[0] - gc_before, 1),
                         "device_allocs": torch.cuda.memory_stats().get("num_device_alloc", 0) - dev_before,
                         "running": len(core.scheduler.running), "waiting": len(core.scheduler.waiting),
                         "decode_sm": getattr(lanes, "decode_sm", None), "stacks": list(stacks)})


apply = RequestState.apply


@functools.wraps(apply)
def noted_apply(self, out, now):
    times = self.metrics.token_times
    last, k = (times[-1] if times else None), len(times)
    result = apply(self, out, now)
    if last is not None and len(times) > k and (now - last) * 1e3 > GAP_MS:
        gaps.append({"t": round(now % 1000, 3), "gap_ms": round((now - last) * 1e3, 1), "request": self.request_id,
                     "prompt_len": self.num_prompt_tokens, "output_index": k, "new_tokens": len(times) - k,
                     "recent": list(recent)})
    return result


def dump():
    with open(os.environ.get("STALLS", "stalls.json"), "w") as f:
        json.dump({"slow_steps": slow, "long_gaps": gaps, "long_gcs": long_gcs, "gc_ms": round(gc_ms[0], 1),
                   "gc_collections": gc_counts, "gc_frozen_objects": frozen[0]}, f, indent=1)


gc.callbacks.append(on_gc)
if os.environ.get("NO_FREEZE"):  # the A of an A/B: the engine's freeze_startup_heap freezes nothing
    gc.freeze = lambda: None
threading.Thread(target=watchdog, daemon=True).start()
LLMEngine.step = timed_step
RequestState.apply = noted_apply
atexit.register(dump)
sys.argv = ["splitserve", *sys.argv[1:]]
main()
