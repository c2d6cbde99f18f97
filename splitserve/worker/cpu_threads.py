"""How many torch threads CPU inference uses (engine argument `cpu_threads`; measurements: docs/CPU-THREADS.md).

torch's default is one thread per core. Its OpenMP team waits at a barrier after every operator, so when
any other process takes a core the whole team waits for the thread that lost it: on a loaded 2-core
machine a decode step ran many times slower at 2 threads than at 1. The automatic choice therefore
leaves half of the cores free (at least one thread, at most 8: a small model's decode step is bound by
memory bandwidth well before that). OMP_NUM_THREADS, when set, is the user's choice and is kept.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("splitserve")

MAX_AUTO_THREADS = 8
_reported: set[tuple[int, str]] = set()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def auto_cpu_threads(cores: int | None = None) -> int:
    cores = available_cores() if cores is None else cores
    return max(1, min(cores // 2, MAX_AUTO_THREADS))


def set_cpu_threads(requested: int | None) -> int:
    """Apply `requested` threads (None: automatic) to torch in this process; returns the count used."""
    if requested is not None:
        threads, why = requested, "cpu_threads"
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads, why = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        threads, why = auto_cpu_threads(), f"auto: half of {available_cores()} cores"
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if (threads, why) not in _reported:  # once per process and choice, not once per engine
        _reported.add((threads, why))
        logger.info("CPU inference on %d torch thread(s) (%s; --cpu-threads N to change)", threads, why)
    return threads
