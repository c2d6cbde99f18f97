"""Keep the garbage collector's full passes short while serving."""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger("splitserve")

frozen_objects = 0  # this process's objects frozen at start-up (a process-wide fact: the collector is one too)


def freeze_startup_heap() -> None:
    """Move every object alive now into the collector's permanent generation, once a serving process's start-up
    is done (`serve`, the engine-core and PD worker processes, `bench pdmux`).

    A full (generation-2) collection walks every tracked object, and a process holding torch, transformers and
    an engine has about half a million: 0.2-0.3 s on an H200 host, during which no step is launched and every
    running request's next token waits (docs/PD-MULTIPLEX.md, twelfth session). What start-up made lives as long
    as the engine and needs no collecting; frozen, it is no longer walked. vLLM and SGLang do the same. A
    process that tears an engine down and builds another calls `thaw` first, or the old engine's reference
    cycles are never freed; the offline `LLM` does not freeze (tests build many engines in one process)."""
    global frozen_objects
    gc.collect()
    gc.freeze()
    frozen_objects = gc.get_freeze_count()  # walks the frozen list: once, never per step
    logger.info("garbage collector: %d start-up objects frozen (full collections no longer walk them)",
                frozen_objects)


def thaw() -> None:
    """Undo `freeze_startup_heap` (before an engine is torn down in a process that goes on)."""
    global frozen_objects
    gc.unfreeze()
    frozen_objects = 0
