"""PDClient: a core client over a prefill worker and a decode worker (M1).

The coordinator holds no model. The front end (engine.LLMEngine) tokenizes and validates as always and
talks to this client as it would to an in-process EngineCore: requests go to the prefill worker, the
small offer/accept/reject messages are relayed between the workers, and their token outputs come back.
Worker death is seen at once: each worker's process sentinel (a pidfd) is waited on together with the
connections, so the next `step()` raises WorkerDiedError, after stopping the other worker (a short grace,
then killed); no process is left behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from multiprocessing.connection import wait

import torch

from splitserve.config import EngineConfig, ModelSpec
from splitserve.disagg.channel import Channel, handshake
from splitserve.disagg.messages import (
    Abort,
    Accept,
    Add,
    Error,
    Hello,
    Offer,
    Outputs,
    Ready,
    Reject,
    Setup,
    Stats,
    Stop,
)
from splitserve.disagg.worker import AUTHKEY_ENV
from splitserve.engine.messages import CoreGauges, CoreOutput, CoreRequest

logger = logging.getLogger("splitserve")
POLL_S = 0.005
STARTUP_TIMEOUT_S = 600.0
STOP_GRACE_S = 0.5  # a worker told to stop gets this long before it is killed


def pd_devices(config: EngineConfig) -> tuple[str, str]:
    """The two worker devices, or a ValueError that names what is wrong."""
    p_id, d_id = config.prefill_device_id, config.decode_device_id
    if config.pd_remote_decode:  # the decode device is the other host's business
        if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
            return "cpu", "remote"
        return f"cuda:{p_id or 0}", "remote"
    ids_given = p_id is not None or d_id is not None
    if config.device.startswith("cuda:"):
        raise ValueError(f"device={config.device!r} cannot be used with enable_two_gpu_pd: "
                         "choose the GPUs with prefill_device_id and decode_device_id")
    use_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if use_cpu:
        if ids_given:
            where = "device='cpu'" if config.device == "cpu" else "no CUDA GPU is available, and device='auto'"
            raise ValueError(f"{where} cannot be combined with CUDA ids (prefill_device_id={p_id}, "
                             f"decode_device_id={d_id}); on CPU the two workers are CPU processes")
        return "cpu", "cpu"
    count = torch.cuda.device_count()
    if count < 2:
        raise ValueError(f"enable_two_gpu_pd needs two GPUs, found {count}")
    p_id = 0 if p_id is None else p_id
    d_id = 1 if d_id is None else d_id
    if p_id == d_id:
        raise ValueError(f"prefill_device_id and decode_device_id must differ (both are {p_id})")
    for name, value in (("prefill_device_id", p_id), ("decode_device_id", d_id)):
        if value >= count:
            raise ValueError(f"{name}={value} does not exist: this machine has GPUs 0..{count - 1}")
    if not torch.cuda.can_device_access_peer(p_id, d_id):
        logger.warning("no P2P access between GPU %d and GPU %d: NCCL will stage KV transfers through host memory",
                       p_id, d_id)
    return f"cuda:{p_id}", f"cuda:{d_id}"


def listen_address(remote: str) -> tuple[str, int]:
    """Where the coordinator listens for a remote decode worker: "HOST:PORT", or ":PORT" for loopback
    (all interfaces only when asked for, as 0.0.0.0)."""
    host, sep, port = remote.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"pd_remote_decode must be HOST:PORT or :PORT, got {remote!r}")
    return host or "127.0.0.1", int(port)


class WorkerDiedError(RuntimeError):
    pass


def worker_config(config: EngineConfig, role: str, device: str) -> EngineConfig:
    """A worker's own engine config: one device, no PD; prefill never runs a decode batch (no graphs, no
    pipeline), decode sizes its cache by pd_decode_num_kv_blocks."""
    config = dataclasses.replace(config, device=device, enable_two_gpu_pd=False, prefill_device_id=None,
                                 decode_device_id=None, pd_remote_decode=None)
    if role == "prefill":
        return dataclasses.replace(config, enforce_eager=True, enable_decode_pipeline=False,
                                   decode_memory_sm=None, decode_compute_sm=None, decode_pipeline_profiling=False)
    return dataclasses.replace(config, num_kv_blocks=config.pd_decode_num_kv_blocks or config.num_kv_blocks)


class _Worker:
    """One worker as the coordinator sees it: process (None when remote), its exit sentinel, its channel."""

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


class PDClient:
    def __init__(self, config: EngineConfig, model: ModelSpec):
        t0 = time.perf_counter()
        self.config = config
        self.devices = dict(zip(("prefill", "decode"), pd_devices(config)))
        self.workers: dict[str, _Worker] = {}
        self.requests: dict[str, CoreRequest] = {}  # unfinished, as this client knows them
        self.num_relayed = 0
        self.dead: str | None = None
        self.listener: socket.socket | None = None
        self.store_file: str | None = None
        # Workers are stopped at interpreter exit too (they live in their own sessions: no Ctrl-C reaches them).
        self._finalizer = weakref.finalize(self, _stop_workers, self.workers, STOP_GRACE_S)
        try:
            self._start_workers()
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = min(w.max_model_len for w in self.workers.values())
        self.startup_time_s = time.perf_counter() - t0

    # ---- workers ----
    def _start_workers(self) -> None:
        remote = self.config.pd_remote_decode
        if remote:  # a decode worker on another host connects to us with the shared secret
            key = os.environ.get(AUTHKEY_ENV)
            if not key:
                raise ValueError(f"pd_remote_decode needs {AUTHKEY_ENV} set (the same secret on both hosts)")
            if "MASTER_ADDR" not in os.environ:
                raise ValueError("pd_remote_decode needs MASTER_ADDR and MASTER_PORT (this host's address and a "
                                 "free port, reachable from the decode host: the torch.distributed rendezvous)")
            address = listen_address(remote)
        else:
            key, address = secrets.token_hex(16), ("127.0.0.1", 0)
        if remote:
            rendezvous = ("env://", os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", 29500)))
        else:  # one host: a file store, so nothing listens on a network port for the KV channel
            self.store_file = os.path.join(tempfile.gettempdir(), f"splitserve-pd-{secrets.token_hex(8)}")
            rendezvous = (f"file://{self.store_file}", None, None)
        self.listener = socket.create_server(address)
        self.listener.settimeout(0.2)
        host, port = self.listener.getsockname()[:2]
        local_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        env = {**os.environ, AUTHKEY_ENV: key}
        for role in ("prefill",) if remote else ("prefill", "decode"):
            cmd = [sys.executable, "-m", "splitserve", "pd-worker", "--coordinator", f"{local_host}:{port}",
                   "--role", role, "--device", self.devices[role], "--connect-timeout", "60",
                   "--parent-pid", str(os.getpid())]
            self.workers[role] = _Worker(role, subprocess.Popen(cmd, env=env, start_new_session=True))
        if remote:
            self.workers["decode"] = _Worker("decode", None)
            logger.warning("waiting for the decode worker: on the decode host run `%s=... splitserve pd-worker "
                           "--coordinator %s --device cuda:N`", AUTHKEY_ENV, remote)
        accepted: list[tuple[Hello, Channel]] = []
        threading.Thread(target=self._accept, args=(key.encode(), accepted), daemon=True).start()
        # A remote worker runs on the device it was started with (worker_main puts it into its config).
        setups = {role: Setup(worker_config(self.config, role, self.config.device if dev == "remote" else dev),
                              *rendezvous) for role, dev in self.devices.items()}
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
        logger.info("two-device PD: prefill on %s, decode on %s", self.devices["prefill"], self.devices["decode"])

    def _accept(self, key: bytes, accepted: list) -> None:
        """Accept worker connections until both roles have one. A peer with a wrong key, or one that says
        nothing, is dropped after its handshake fails or times out; accepting goes on."""
        while self.listener is not None and any(w.channel is None for w in self.workers.values()):
            try:
                sock, peer = self.listener.accept()
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

    def worker_pids(self) -> dict[str, int]:
        return {role: w.proc.pid for role, w in self.workers.items() if w.proc is not None}

    def _died(self, reason: str) -> None:
        self.dead = f"{reason}; the other worker was stopped"
        self.shutdown(STOP_GRACE_S)
        raise WorkerDiedError(self.dead)

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop both workers (told to stop, then killed after `grace_s`); safe to call twice."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self._finalizer.detach()
        _stop_workers(self.workers, grace_s)
        if self.store_file is not None and os.path.exists(self.store_file):
            os.remove(self.store_file)

    # ---- the core client ----
    def add(self, request: CoreRequest) -> None:
        self._check_alive()
        self.requests[request.request_id] = request
        self._send("prefill", Add(request))

    def abort(self, request_ids: list[str]) -> None:
        ids = [r for r in request_ids if self.requests.pop(r, None) is not None]
        if not ids or self.dead is not None:
            return
        for role in ("prefill", "decode"):
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

    def _dispatch(self, worker: _Worker, msg, outputs: list[CoreOutput]) -> None:
        if isinstance(msg, Outputs):
            worker.gauges = msg.gauges
            for out in msg.outputs:
                if out.request_id in self.requests:  # else aborted here: the worker's last words do not matter
                    outputs.append(out)
                    if out.finish_reason is not None:
                        del self.requests[out.request_id]
        elif isinstance(msg, Offer):
            request = self.requests.get(msg.request_id)
            if request is None:
                self._send("prefill", Reject(msg.request_id))  # aborted while it was prefilled
            else:
                self._send("decode", dataclasses.replace(msg, request=request))
                self.num_relayed += 1
        elif isinstance(msg, (Accept, Reject)):
            self._send("prefill", msg)
        elif isinstance(msg, Ready):
            worker.stats, worker.max_model_len = msg.stats, msg.max_model_len
        elif isinstance(msg, Stats):
            worker.stats = msg.stats
        elif isinstance(msg, Error):
            self._died(f"the {msg.role} worker failed:\n{msg.traceback}")

    def gauges(self) -> CoreGauges:
        d = self.workers["decode"].gauges
        waiting = len(self.requests) - (d.running if d else 0)
        if d is None:
            return CoreGauges(0, waiting, 0.0, 0, "cuda_graph" if self.devices["decode"] != "cpu" else "eager")
        return dataclasses.replace(d, waiting=max(0, waiting))

    def stats(self) -> dict:
        p, d = self.workers["prefill"].stats, self.workers["decode"].stats
        g = self.gauges()
        return {
            "mode": "two_device_pd", "devices": self.devices, "running": g.running, "waiting": g.waiting,
            "kv_usage": g.kv_usage, "kv_used_blocks": p.get("kv_used_blocks", 0) + d.get("kv_used_blocks", 0),
            "num_preemptions": g.num_preemptions, "decode_path": d.get("decode_path"),
            "decode_memory_sm": d.get("decode_memory_sm"), "decode_compute_sm": d.get("decode_compute_sm"),
            "decode_pipeline": d.get("decode_pipeline"),
            "prefix_cache_hit_tokens": p.get("prefix_cache_hit_tokens", 0), "num_relayed_offers": self.num_relayed,
            "prefill": p, "decode": d,
        }


def _stop_workers(workers: dict[str, _Worker], grace_s: float) -> None:
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
