"""CoreProcClient: the engine core in a process of its own, behind the calls of the in-process one (vLLM v1's
split of front end and engine core).

In one process the core's step loop and the front end (detokenization, stop strings, outputs; a server's
HTTP and streaming) take turns on one GIL, and on a host-bound step (grammar masks, small models) every
microsecond of the front end is a microsecond the device waits. Here the core process steps on its own,
back to back, and sends each step's outputs; the front end takes them in while the next step runs. The
worker process, its channel and its death are handled as for the PD workers (disagg/procs.py).
"""

from __future__ import annotations

import dataclasses
import secrets
import time

from splitserve.config import EngineConfig, ModelSpec
from splitserve.disagg.messages import GetStats, Setup
from splitserve.disagg.procs import POLL_S, ProcClient
from splitserve.engine.messages import CoreGauges, CoreOutput

ROLE = "core"


class CoreProcClient(ProcClient):
    entry_role = ROLE

    def __init__(self, config: EngineConfig, model: ModelSpec):
        super().__init__()
        t0 = time.perf_counter()
        self.early: list[CoreOutput] = []  # outputs that came in while `stats()` waited for its answer
        core_config = dataclasses.replace(config, engine_core_process=False)
        try:
            self._start_workers({ROLE: Setup(core_config)}, {ROLE: config.device}, secrets.token_hex(16),
                                ("127.0.0.1", 0))
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = self.workers[ROLE].max_model_len
        self.startup_time_s = time.perf_counter() - t0

    def has_unfinished(self) -> bool:
        return bool(self.requests or self.early)  # a finished request's last output may wait in `early`

    def step(self) -> list[CoreOutput]:
        """The outputs that came since the last call: waits up to POLL_S for some when none came."""
        self._check_alive()
        early, self.early = self.early, []
        return early + self._poll(0.0 if early else POLL_S)

    def gauges(self) -> CoreGauges:
        g = self.workers[ROLE].gauges  # as of the last outputs
        if self.dead is not None:  # nothing runs or waits in a dead core
            return CoreGauges(0, 0, 0.0, g.num_preemptions if g else 0, g.decode_path if g else "eager")
        if g is None:
            return CoreGauges(0, len(self.requests), 0.0, 0, self.workers[ROLE].stats.get("decode_path", "eager"))
        return dataclasses.replace(g, waiting=max(0, len(self.requests) - g.running))

    def stats(self) -> dict:
        """The core's stats, asked for now and answered between two of its steps."""
        self._check_alive()
        worker = self.workers[ROLE]
        worker.stats = None
        self._send(ROLE, GetStats())
        while worker.stats is None:
            self.early += self._poll(POLL_S)
        return {**worker.stats, "engine_core_process": {"pid": worker.proc.pid}}
