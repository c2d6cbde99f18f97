"""Worker processes as a core client sees them: the two PD workers (coordinator.py) or one engine core in a
process of its own (engine/core_client.py).

Each worker is started as `python -m splitserve pd-worker --role ROLE` (one launch path; no user script is
re-imported), connects back over a signed channel (channel.py), gets its `Setup` and answers `Ready`. Worker
death is seen at once: each worker's process sentinel (a pidfd) is waited on together with the connections,
so the next `step()` raises WorkerDiedError, after stopping the other workers (a short grace, then killed);
no process is left behind.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import wait

from splitserve.disagg.channel import Channel, handshake
from splitserve.disagg.messages import Abort, Add, Error, Hello, Outputs, Ready, Setup, Stats, Stop
from splitserve.engine.messages import CoreDiedError, CoreGauges, CoreOutput, CoreRequest

logger = logging.getLogger("splitserve")
AUTHKEY_ENV = "SPLITSERVE_PD_AUTHKEY"
LOG_LEVEL_ENV = "SPLITSERVE_WORKER_LOG_LEVEL"  # a local worker logs at its client's level
POLL_S = 0.005
STARTUP_TIMEOUT_S = 600.0
STOP_GRACE_S = 0.5  # a worker told to stop gets this long before it is killed


class WorkerDiedError(CoreDiedError):
    pass


class Worker:
    """One worker as the client sees it: process (None when remote), its exit sentinel, its channel."""

    def __init__(self, role: str, proc: subprocess.Popen | None):
        self.role, self.proc, self.channel = role, proc, None
        self.sentinel = os.pidfd_open(proc.pid) if proc is not None else None
        self.stats: dict = {}
        self.gauges: CoreGauges | None = None
        self.max_model_len: int | None = None

    def describe_exit(self) -> str:
        if self.proc is None:
            return f"the {self.role} worker closed its connection"
        try:
            code = self.proc.wait(2.0)  # its sentinel fired or its connection closed: it is exiting
        except subprocess.TimeoutExpired:
            return f"the {self.role} worker (pid {self.proc.pid}) closed its connection"
        return f"the {self.role} worker (pid {self.proc.pid}) exited with code {code}"


class ProcClient:
    """The part of a core client that every set of worker processes shares: start, poll, relay outputs, stop.
    `requests` holds the unfinished requests as this client knows them; a worker's output for any other
    (aborted here) is dropped."""

    def __init__(self):
        self.workers: dict[str, Worker] = {}
        self.requests: dict[str, CoreRequest] = {}
        self.dead: str | None = None
        self.listener: socket.socket | None = None
        # Workers are stopped at interpreter exit too (they live in their own sessions: no Ctrl-C reaches them).
        self._finalizer = weakref.finalize(self, _stop_workers, self.workers, STOP_GRACE_S)

    # ---- start ----
    def _start_workers(self, setups: dict[str, Setup], local: dict[str, str], key: str,
                       address: tuple[str, int]) -> None:
        """Start a process per `local` role (role -> device), listen on `address` for every role in `setups`
        (a role not in `local` is a worker started by hand on another host), send each its Setup, and wait
        until all are ready."""
        self.listener = socket.create_server(address)
        self.listener.settimeout(0.2)
        host, port = self.listener.getsockname()[:2]
        local_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        env = {**os.environ, AUTHKEY_ENV: key, LOG_LEVEL_ENV: str(logger.getEffectiveLevel())}
        for role in setups:
            proc = None
            if role in local:
                cmd = [sys.executable, "-m", "splitserve", "pd-worker", "--coordinator", f"{local_host}:{port}",
                       "--role", role, "--device", local[role], "--connect-timeout", "60",
                       "--parent-pid", str(os.getpid())]
                proc = subprocess.Popen(cmd, env=env, start_new_session=True)
            self.workers[role] = Worker(role, proc)
        accepted: list[tuple[Hello, Channel]] = []
        threading.Thread(target=self._accept, args=(key.encode(), accepted), daemon=True).start()
        deadline = time.time() + STARTUP_TIMEOUT_S
        while any(w.max_model_len is None for w in self.workers.values()):
            while accepted:
                hello, channel = accepted.pop()
                worker = self.workers.get(hello.role)
                if worker is None or worker.channel is not None:
                    channel.close()  # a second worker for a role: not ours
                    continue
                worker.channel = channel
                channel.send(setups[hello.role])
            self._poll(0.1)
            if time.time() > deadline:
                raise WorkerDiedError(f"workers not ready after {STARTUP_TIMEOUT_S:.0f} s")
        self.listener.close()  # every role has its connection: nobody else may queue on the port
        self.listener = None

    def _accept(self, key: bytes, accepted: list) -> None:
        """Accept worker connections until every role has one. A peer with a wrong key, or one that says
        nothing, is dropped after its handshake fails or times out; accepting goes on."""
        while any(w.channel is None for w in self.workers.values()):
            listener = self.listener
            if listener is None:
                return  # every worker came, or the client shut down
            try:
                sock, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            threading.Thread(target=self._handshake, args=(sock, peer, key, accepted), daemon=True).start()

    def _handshake(self, sock, peer, key: bytes, accepted: list) -> None:
        try:
            channel = handshake(sock, key, is_coordinator=True)
            hello = channel.recv()
            if not isinstance(hello, Hello):
                raise ConnectionError(f"expected a worker's hello, got {type(hello).__name__}")
        except (ConnectionError, EOFError, OSError) as e:
            if self.listener is not None:  # after shutdown a late failure is nobody's concern
                logger.warning("refused a control connection from %s: %s", peer[0], e)
            return
        accepted.append((hello, channel))

    def alive(self) -> bool:
        """False once a worker has died, seen at once from any thread (its sentinel), even while no step runs."""
        if self.dead is not None:
            return False
        sentinels = [w.sentinel for w in self.workers.values() if w.sentinel is not None]
        try:
            return not sentinels or not wait(sentinels, timeout=0)
        except (OSError, ValueError):  # closed under us: the client is shutting down
            return False

    def worker_pids(self) -> dict[str, int]:
        return {role: w.proc.pid for role, w in self.workers.items() if w.proc is not None}

    # ---- stop ----
    def _died(self, reason: str) -> None:
        self.dead = f"{reason}; the other workers were stopped" if len(self.workers) > 1 else reason
        self.shutdown(STOP_GRACE_S)
        raise WorkerDiedError(self.dead)

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop the workers (told to stop, then killed after `grace_s`); safe to call twice."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self._finalizer.detach()
        _stop_workers(self.workers, grace_s)

    # ---- the core client's common calls ----
    entry_role = ""  # the worker that takes new requests

    def add(self, request: CoreRequest) -> None:
        self._check_alive()
        self.requests[request.request_id] = request
        self._send(self.entry_role, Add(request))

    def abort(self, request_ids: list[str]) -> None:
        ids = [r for r in request_ids if self.requests.pop(r, None) is not None]
        if not ids or self.dead is not None:
            return
        for role in self.workers:
            try:
                self._send(role, Abort(ids))
            except WorkerDiedError:
                return  # abort never raises: the requests went with the worker, and the next step() says why

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[CoreOutput]:
        self._check_alive()
        return self._poll(POLL_S)

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise WorkerDiedError(self.dead)

    def _send(self, role: str, msg) -> None:
        try:
            self.workers[role].channel.send(msg)
        except (OSError, AttributeError):
            self._died(self.workers[role].describe_exit())

    def _poll(self, timeout: float) -> list[CoreOutput]:
        """Wait up to `timeout` for messages or a worker's exit; handle what came."""
        sources = {}
        for w in self.workers.values():
            if w.sentinel is not None:
                sources[w.sentinel] = w
            if w.channel is not None:
                sources[w.channel] = w
        outputs: list[CoreOutput] = []
        for ready in wait(list(sources), timeout=timeout):
            worker = sources[ready]
            if ready is worker.sentinel:
                self._died(worker.describe_exit())
            try:
                while worker.channel.poll():
                    self._dispatch(worker, worker.channel.recv(), outputs)
            except (EOFError, OSError):
                self._died(worker.describe_exit())
        return outputs

    def _dispatch(self, worker: Worker, msg, outputs: list[CoreOutput]) -> None:
        if isinstance(msg, Outputs):
            worker.gauges = msg.gauges
            for out in msg.outputs:
                if out.request_id in self.requests:  # else aborted here: the worker's last words do not matter
                    outputs.append(out)
                    if out.finish_reason is not None:
                        del self.requests[out.request_id]
        elif isinstance(msg, Ready):
            worker.stats, worker.max_model_len = msg.stats, msg.max_model_len
        elif isinstance(msg, Stats):
            worker.stats = msg.stats
        elif isinstance(msg, Error):
            if worker.max_model_len is None and msg.refused is not None:  # the config, refused before it was ready
                self.shutdown(STOP_GRACE_S)
                self.dead = f"the {msg.role} worker refused its config: {msg.refused}"
                raise ValueError(msg.refused)
            self._died(f"the {msg.role} worker failed:\n{msg.traceback}")
        else:
            self._relay(worker, msg)

    def _relay(self, worker: Worker, msg) -> None:
        raise TypeError(f"unexpected message from the {worker.role} worker: {type(msg).__name__}")


def _stop_workers(workers: dict[str, Worker], grace_s: float) -> None:
    for w in workers.values():
        try:
            if w.channel is not None:
                w.channel.send(Stop())
        except OSError:
            pass
    deadline = time.time() + grace_s
    for w in workers.values():
        if w.proc is None:
            continue
        try:
            w.proc.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
    for w in workers.values():
        if w.channel is not None:
            w.channel.close()
            w.channel = None
        if w.sentinel is not None:
            os.close(w.sentinel)
            w.sentinel = None
