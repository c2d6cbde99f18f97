"""PDEngine: the LLMEngine interface over a prefill worker and a decode worker (M1).

The coordinator holds no model. It validates and tokenizes requests (inherited from LLMEngine), sends
them to the prefill worker, relays the small offer/accept/reject messages between the workers, and
mirrors each request's tokens and text from their reports. LLM.generate and the HTTP server drive it
exactly like the colocated engine. If a worker dies, the next `step()` raises within its poll interval
(milliseconds) after stopping the other worker; no process is left behind.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import threading
import time
from multiprocessing.connection import Listener, wait

import torch

from splitserve.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger("splitserve")
POLL_S = 0.005
STARTUP_TIMEOUT_S = 600.0


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerDiedError(RuntimeError):
    pass


class PDEngine(LLMEngine):
    def __init__(self, config: EngineConfig):
        t0 = time.perf_counter()
        self._init_frontend(config)
        self.devices = dict(zip(("prefill", "decode"), pd_devices(config)))
        self.procs: dict[str, mp.process.BaseProcess] = {}
        self.conns: dict = {}
        self.worker_stats: dict[str, dict] = {}
        self.num_relayed = 0
        try:
            self._start_workers()
        except BaseException:
            self.shutdown()
            raise
        self._fit_max_model_len(min(s["max_model_len"] for s in self.worker_stats.values()))
        self.startup_time_s = time.perf_counter() - t0

    # ---- workers ----
    def _start_workers(self) -> None:
        from splitserve.disagg.worker import worker_main

        remote = self.config.pd_remote_decode
        if remote:  # a decode worker on another host connects to us with the shared secret
            key = os.environ.get("SPLITSERVE_PD_AUTHKEY")
            if not key:
                raise ValueError("pd_remote_decode needs SPLITSERVE_PD_AUTHKEY set (the same secret on both hosts)")
            authkey = key.encode()
            host, _, port = remote.rpartition(":")
            self.listener = Listener((host or "0.0.0.0", int(port)), authkey=authkey)
        else:
            authkey = os.urandom(16)
            self.listener = Listener(("127.0.0.1", 0), authkey=authkey)
        master_addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        master_port = int(os.environ.get("MASTER_PORT", 0)) or _free_port()
        if remote and "MASTER_ADDR" not in os.environ:
            raise ValueError("pd_remote_decode needs MASTER_ADDR and MASTER_PORT (this host's address and a free "
                             "port, reachable from the decode host: the torch.distributed rendezvous)")
        ctx = mp.get_context("spawn")  # CUDA cannot be forked
        for role in ("prefill",) if remote else ("prefill", "decode"):
            proc = ctx.Process(target=worker_main, name=f"splitserve-{role}", daemon=True,
                               args=(role, self.devices[role], self.listener.address, authkey))
            proc.start()
            self.procs[role] = proc
        if remote:
            logger.warning("waiting for the decode worker: on the decode host run `SPLITSERVE_PD_AUTHKEY=... "
                           "splitserve pd-worker --coordinator %s --device cuda:N`", remote)
        accepted: list = []

        def accept() -> None:
            for _ in range(2):
                conn = self.listener.accept()
                _, role, _pid = conn.recv()
                conn.send(("config", self.config, master_addr, master_port))
                accepted.append((role, conn))

        threading.Thread(target=accept, daemon=True).start()
        deadline = time.time() + STARTUP_TIMEOUT_S
        while len(self.worker_stats) < 2:
            self._check_workers()
            for role, conn in accepted:
                self.conns.setdefault(role, conn)
            for conn in wait(list(self.conns.values()), timeout=0.1):
                self._dispatch(conn.recv(), [])
            if time.time() > deadline:
                raise WorkerDiedError(f"workers not ready after {STARTUP_TIMEOUT_S:.0f} s")
        logger.info("two-device PD: prefill on %s, decode on %s", self.devices["prefill"], self.devices["decode"])

    def worker_pids(self) -> dict[str, int]:
        return {role: p.pid for role, p in self.procs.items()}

    def _check_workers(self) -> None:
        for role, proc in self.procs.items():
            if proc.exitcode is not None:
                self._died(f"the {role} worker (pid {proc.pid}) exited with code {proc.exitcode}")

    def _lost(self, role: str) -> None:
        """A worker's connection closed: name the worker, with its exit code when it is a local process."""
        proc = self.procs.get(role)
        if proc is not None:
            proc.join(1.0)  # a killed process needs a moment before its exit code can be read
            if proc.exitcode is not None:
                self._died(f"the {role} worker (pid {proc.pid}) exited with code {proc.exitcode}")
        self._died(f"the {role} worker closed its connection")

    def _died(self, reason: str) -> None:
        self.shutdown()
        for seq in self.requests.values():
            if not seq.is_finished:
                seq.finish_reason = "abort"
                seq.status = SequenceStatus.FINISHED
        raise WorkerDiedError(f"{reason}; the other worker was stopped")

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop both workers (politely, then by force); safe to call twice."""
        for conn in self.conns.values():
            try:
                conn.send(("stop",))
            except OSError:
                pass
        deadline = time.time() + timeout
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.time()))
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns.values():
            conn.close()
        self.conns = {}
        if getattr(self, "listener", None) is not None:
            self.listener.close()
            self.listener = None

    def __del__(self):
        try:
            self.shutdown(timeout=1.0)
        except Exception:
            pass

    # ---- requests ----
    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self.requests[seq.request_id] = seq
        self._send("prefill", ("add", seq.request_id, seq.prompt_token_ids, seq.sampling_params, seq.prompt))

    def abort(self, request_id: str) -> bool:
        seq = self.requests.get(request_id)
        if seq is None or seq.is_finished:
            return False
        seq.finish_reason = "abort"
        seq.status = SequenceStatus.FINISHED
        seq.metrics.finished_time = time.time()
        for role in ("prefill", "decode"):
            self._send(role, ("abort", request_id))
        return True

    def has_unfinished_requests(self) -> bool:
        return any(not s.is_finished for s in self.requests.values())

    def _send(self, role: str, msg) -> None:
        try:
            self.conns[role].send(msg)
        except (OSError, KeyError):
            self._check_workers()
            self._lost(role)

    # ---- one step: relay messages and apply reports ----
    def step(self) -> list[Sequence]:
        self._check_workers()
        updated: list[Sequence] = []
        role_of = {id(c): r for r, c in self.conns.items()}
        for conn in wait(list(self.conns.values()), timeout=POLL_S):
            try:
                while conn.poll():
                    self._dispatch(conn.recv(), updated)
            except (EOFError, OSError):
                self._lost(role_of.get(id(conn), "a"))
        self.num_steps += 1
        return list(dict.fromkeys(updated))

    def _dispatch(self, msg, updated: list[Sequence]) -> None:
        kind = msg[0]
        if kind == "out":
            _, role, updates, stats = msg
            self.worker_stats[role] = stats
            for update in updates:
                seq = self._apply(update)
                if seq is not None:
                    updated.append(seq)
        elif kind == "offer":
            seq = self.requests.get(msg[1])
            if seq is None or seq.is_finished:
                self._send("prefill", ("reject", msg[1]))  # aborted while it was prefilled
            else:
                self._send("decode", msg)
                self.num_relayed += 1
        elif kind in ("accept", "reject"):
            self._send("prefill", msg)
        elif kind in ("ready", "stats"):
            self.worker_stats[msg[1]] = msg[2]
        elif kind == "error":
            self._died(f"the {msg[1]} worker failed:\n{msg[2]}")

    def _apply(self, update) -> Sequence | None:
        (request_id, new_tokens, start, chunk, logprobs, cumulative, finish_reason, stop_reason, cached) = update
        seq = self.requests.get(request_id)
        if seq is None or seq.is_finished:
            return None  # aborted here; the worker's last words about it do not matter
        now = time.time()
        seq.status = SequenceStatus.RUNNING
        seq.token_ids += new_tokens
        seq.output_text = seq.output_text[:start] + chunk
        if logprobs is not None and seq.logprobs is not None:
            seq.logprobs += logprobs
        seq.cumulative_logprob, seq.num_cached_tokens = cumulative, cached
        if new_tokens:
            if seq.metrics.first_token_time is None:
                seq.metrics.first_token_time = now
            seq.metrics.last_token_time = now
            seq.metrics.token_times += [now] * len(new_tokens)
        if finish_reason is not None:
            seq.finish_reason, seq.stop_reason = finish_reason, stop_reason
            seq.status = SequenceStatus.FINISHED
            seq.metrics.finished_time = now
        return seq

    def release(self, seq: Sequence) -> None:
        self.requests.pop(seq.request_id, None)

    def stats(self) -> dict:
        p, d = self.worker_stats.get("prefill", {}), self.worker_stats.get("decode", {})
        waiting = sum(1 for s in self.requests.values() if not s.is_finished and s.status != SequenceStatus.RUNNING)
        return {
            "mode": "two_device_pd", "devices": self.devices, "running": d.get("running", 0),
            "waiting": waiting, "kv_usage": d.get("kv_usage", 0.0),
            "kv_used_blocks": p.get("kv_used_blocks", 0) + d.get("kv_used_blocks", 0),
            "num_preemptions": d.get("num_preemptions", 0), "decode_path": d.get("decode_path"),
            "decode_attention_sm": d.get("decode_attention_sm"), "decode_ffn_sm": d.get("decode_ffn_sm"),
            "decode_pipeline": d.get("decode_pipeline"),
            "prefix_cache_hit_tokens": p.get("prefix_cache_hit_tokens", 0), "num_relayed_offers": self.num_relayed,
            "startup_time_s": getattr(self, "startup_time_s", None), "prefill": p, "decode": d,
        }
