"""Keep the garbage collector's full passes short while serving."""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger("splitserve")

frozen_objects = 0  # objects frozen by freeze_startup_heap in this process (the collector is per process)


def freeze_startup_heap() -> None:
    """Move every object alive now into the collector's permanent generation, once a serving process's start-up
    is done (`serve`, the engine-core and PD worker processes, `bench pdmux`).

    A full (generation-2) collection walks every tracked object, and a process holding torch, transformers and
    an engine has about half a million: up to 0.29 s on an H200 host, while no step is launched and every
    running request's next token waits (the likely cause of the bench's rare 0.24-0.3 s gaps:
    docs/PD-MULTIPLEX.md, twelfth session). What start-up made lives as long as the engine and needs no
    collecting; frozen, it is no longer walked. vLLM and SGLang do the same. A process that tears an engine
    down and builds another calls `thaw_startup_heap` first, or the old engine's reference cycles are never
    freed. The offline `LLM` does not freeze (tests build many engines in one process)."""
    global frozen_objects
    gc.collect()
    gc.freeze()
    frozen_objects = gc.get_freeze_count()  # walks the frozen list: once, never per step
    logger.info("garbage collector: %d start-up objects frozen (full collections no longer walk them)",
                frozen_objects)


def thaw_startup_heap() -> None:
    """Undo `freeze_startup_heap` (before an engine is torn down in a process that goes on)."""
    global frozen_objects
    gc.unfreeze()
    frozen_objects = 0
