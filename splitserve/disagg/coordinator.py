"""PDClient: a core client over a prefill worker and a decode worker (M1).

The coordinator holds no model. The front end (engine.LLMEngine) tokenizes and validates as always and
talks to this client as it would to an in-process EngineCore: requests go to the prefill worker, the
small offer/accept/reject messages are relayed between the workers, and their token outputs come back.
Starting, polling and stopping the workers is procs.py's (shared with the core process's client).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import tempfile
import time

import torch

from splitserve.config import EngineConfig, ModelSpec
from splitserve.disagg.messages import Accept, Offer, Reject, Setup
from splitserve.disagg.procs import AUTHKEY_ENV, ProcClient, Worker, WorkerDiedError
from splitserve.engine.messages import CoreGauges

__all__ = ["PDClient", "WorkerDiedError", "listen_address", "pd_devices", "worker_config"]
logger = logging.getLogger("splitserve")


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


def worker_config(config: EngineConfig, role: str, device: str) -> EngineConfig:
    """A worker's own engine config: one device, no PD; prefill never runs a decode batch (no graphs, no
    pipeline), decode sizes its cache by pd_decode_num_kv_blocks."""
    config = dataclasses.replace(config, device=device, enable_two_gpu_pd=False, prefill_device_id=None,
                                 decode_device_id=None, pd_remote_decode=None)
    if role == "prefill":
        return dataclasses.replace(config, enforce_eager=True, enable_decode_pipeline=False,
                                   decode_memory_sm=None, decode_compute_sm=None, decode_pipeline_profiling=False)
    return dataclasses.replace(config, num_kv_blocks=config.pd_decode_num_kv_blocks or config.num_kv_blocks)


class PDClient(ProcClient):
    entry_role = "prefill"

    def __init__(self, config: EngineConfig, model: ModelSpec):
        super().__init__()
        t0 = time.perf_counter()
        self.config = config
        self.devices = dict(zip(("prefill", "decode"), pd_devices(config)))
        self.num_relayed = 0
        self.store_file: str | None = None
        try:
            self._start_pd_workers()
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = min(w.max_model_len for w in self.workers.values())
        self.startup_time_s = time.perf_counter() - t0

    def _start_pd_workers(self) -> None:
        remote = self.config.pd_remote_decode
        if remote:  # a decode worker on another host connects to us with the shared secret
            key = os.environ.get(AUTHKEY_ENV)
            if not key:
                raise ValueError(f"pd_remote_decode needs {AUTHKEY_ENV} set (the same secret on both hosts)")
            if "MASTER_ADDR" not in os.environ:
                raise ValueError("pd_remote_decode needs MASTER_ADDR and MASTER_PORT (this host's address and a "
                                 "free port, reachable from the decode host: the torch.distributed rendezvous)")
            address = listen_address(remote)
            rendezvous = ("env://", os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", 29500)))
            logger.warning("waiting for the decode worker: on the decode host run `%s=... splitserve pd-worker "
                           "--coordinator %s --device cuda:N`", AUTHKEY_ENV, remote)
        else:  # one host: a file store, so nothing listens on a network port for the KV channel
            key, address = secrets.token_hex(16), ("127.0.0.1", 0)
            self.store_file = os.path.join(tempfile.gettempdir(), f"splitserve-pd-{secrets.token_hex(8)}")
            rendezvous = (f"file://{self.store_file}", None, None)
        # A remote worker runs on the device it was started with (worker_main puts it into its config).
        setups = {role: Setup(worker_config(self.config, role, self.config.device if dev == "remote" else dev),
                              *rendezvous) for role, dev in self.devices.items()}
        local = {role: dev for role, dev in self.devices.items() if dev != "remote"}
        self._start_workers(setups, local, key, address)
        logger.info("two-device PD: prefill on %s, decode on %s", self.devices["prefill"], self.devices["decode"])

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop both workers (told to stop, then killed after `grace_s`); safe to call twice."""
        super().shutdown(grace_s)
        if self.store_file is not None and os.path.exists(self.store_file):
            os.remove(self.store_file)

    def _relay(self, worker: Worker, msg) -> None:
        if isinstance(msg, Offer):
            request = self.requests.get(msg.request_id)
            if request is None:
                self._send("prefill", Reject(msg.request_id))  # aborted while it was prefilled
            else:
                self._send("decode", dataclasses.replace(msg, request=request))
                self.num_relayed += 1
        elif isinstance(msg, (Accept, Reject)):
            self._send("prefill", msg)
        else:
            super()._relay(worker, msg)

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

