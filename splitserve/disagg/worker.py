"""Worker processes: prefill and decode (M1), or the whole engine core (`engine_core_process`). Each runs an
engine core on its own device; none detokenizes.

Prefill worker: schedules prompts (chunked, prefix-cached), samples the first token, reports it, and
offers the sequence to the decode worker. Prefill pauses while too many offers wait (backpressure).
Decode worker: admits an offer only when its KV cache has room, receives the blocks, and decodes the
sequence in its running batch (CUDA graphs as in the core); its own preemption recomputes locally.

Core worker: the in-process core's loop in a process of its own (engine/core_client.py says why): steps while
it has work, reports each step's outputs, takes requests and aborts between steps.

All are started as `python -m splitserve pd-worker` (locally by their client, or by hand on another
host): one launch path, and no user script is ever re-imported. Control messages are typed records over
a signed channel to the coordinator (messages.py, channel.py); KV goes straight from worker to worker
over torch.distributed (kv_transfer.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import select
import signal
import socket
import threading
import time
import traceback
from collections import deque

import torch

from splitserve.config import EngineConfig
from splitserve.disagg import kv_transfer
from splitserve.disagg.channel import Channel, handshake
from splitserve.disagg.messages import (
    Abort,
    Accept,
    Add,
    Error,
    GetStats,
    Hello,
    Offer,
    Outputs,
    Ready,
    Reject,
    Setup,
    Stats,
    Stop,
)
from splitserve.disagg.procs import AUTHKEY_ENV, LOG_LEVEL_ENV
from splitserve.engine.core import EngineCore
from splitserve.engine.gc_heap import freeze_startup_heap
from splitserve.engine.messages import CoreOutput
from splitserve.engine.sequence import Sequence
from splitserve.models.loader import resolve_model_spec

logger = logging.getLogger("splitserve")


def worker_cli(argv: list[str] | None = None) -> None:
    """`splitserve pd-worker`: a prefill or decode worker (see README, two hosts)."""
    parser = argparse.ArgumentParser(prog="splitserve pd-worker", allow_abbrev=False)
    parser.add_argument("--coordinator", required=True, help="HOST:PORT the coordinator listens on "
                                                             "(its pd_remote_decode)")
    parser.add_argument("--device", default="cuda:0", help="this host's device for the worker")
    parser.add_argument("--role", choices=("prefill", "decode", "core"), default="decode")
    parser.add_argument("--connect-timeout", type=float, default=300.0)
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)  # set by a local coordinator
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
    dump_after = os.environ.get("SPLITSERVE_DUMP_STACKS_AFTER_S", "")
    if dump_after:  # debugging a hang: every thread's stack to stderr after that many seconds
        import faulthandler

        try:
            faulthandler.dump_traceback_later(float(dump_after))
        except (ValueError, OverflowError):
            raise SystemExit(f"SPLITSERVE_DUMP_STACKS_AFTER_S must be a positive number, got {dump_after!r}") from None
    key = os.environ.get(AUTHKEY_ENV)
    if not key:
        raise SystemExit(f"splitserve pd-worker: set {AUTHKEY_ENV} (the same secret as the coordinator's)")
    host, _, port = args.coordinator.rpartition(":")
    logging.basicConfig(level=int(os.environ.get(LOG_LEVEL_ENV, logging.WARNING)),
                        format="%(asctime)s %(levelname)s splitserve: %(message)s")
    worker_main(args.role, args.device, (host, int(port)), key.encode(), args.connect_timeout)


def worker_main(role: str, device: str, address: tuple[str, int], key: bytes, connect_timeout_s: float) -> None:
    """Connect, get the engine config and the rendezvous from the coordinator, serve until told to stop.
    Ctrl-C is the coordinator's to handle: it stops the workers in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = _connect(address, key, connect_timeout_s)
    channel.send(Hello(role, os.getpid()))
    ready = False
    try:
        setup: Setup = channel.recv()
        config = setup.config
        if setup.init_method is not None:  # a PD worker: its own device, and the KV channel to the other one
            torch_device = torch.device(device)
            if torch_device.type == "cuda":
                torch.cuda.set_device(torch_device)
            rank = kv_transfer.PREFILL_RANK if role == "prefill" else kv_transfer.DECODE_RANK
            if setup.master_addr:
                os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = setup.master_addr, str(setup.master_port)
            kv_transfer.init_process_group(rank, torch_device, setup.init_method)
            config = config if config.device == device else _on_device(config, device)
        worker = {"prefill": PrefillWorker, "decode": DecodeWorker, "core": CoreWorker}[role](config, channel)
        freeze_startup_heap()  # this process only serves from here on
        channel.send(Ready(role, worker.core.max_model_len, worker.stats()))
        ready = True
        worker.run()
    except (EOFError, ConnectionError):
        pass  # the coordinator is gone: nothing to report to
    except Exception as e:
        refused = str(e) if isinstance(e, ValueError) and not ready else None  # e.g. a cache too small
        try:
            channel.send(Error(role, traceback.format_exc(), refused))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _die_with_parent(parent_pid: int) -> None:
    """A local worker runs in its own session (Ctrl-C is its client's to handle). If the client's process exits
    without stopping it, a thread here sees that at once (through a pidfd) and kills this process, even while the
    main thread is blocked in a collective. Not PR_SET_PDEATHSIG: that fires when the client's *thread* that
    started the worker exits (an LLM built in a thread pool)."""
    try:
        parent = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        raise SystemExit(1) from None
    if os.getppid() != parent_pid:  # the client died before the line above ran (its pid may be another's now)
        raise SystemExit(1)

    def watch() -> None:
        select.select([parent], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="splitserve-parent-watch", daemon=True).start()


def _on_device(config: EngineConfig, device: str) -> EngineConfig:
    return dataclasses.replace(config, device=device)


def _connect(address: tuple[str, int], key: bytes, timeout_s: float) -> Channel:
    """A worker started by hand may come up before the coordinator listens: retry until the timeout."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return handshake(socket.create_connection(address, timeout=10.0), key, is_coordinator=False)
        except (ConnectionRefusedError, FileNotFoundError):
            if time.time() > deadline:
                raise
            time.sleep(0.2)


class _Worker:
    role = ""
    # PD workers step synchronously: the prefill worker detaches a sequence as soon as a step returns its first
    # token, and the hand-over (token ids, generator state) needs that token resolved, with no step pending.
    synchronous = True

    def __init__(self, config: EngineConfig, channel: Channel):
        self.channel = channel
        self.config = config
        if self.synchronous:
            config = dataclasses.replace(config, async_scheduling=False)
        self.core = EngineCore(config, resolve_model_spec(config))
        self.kv_cache = self.core.runner.kv_cache
        self.num_transfers = 0
        self.transfer_bytes = 0
        self.stopping = False

    def run(self) -> None:
        reported = None
        while not self.stopping:
            busy = self.busy()
            if not busy:  # idle: send the final counters once (transfers finish after the last report)
                key = (self.num_transfers, self.core.num_steps, self.core.scheduler.num_preemptions)
                if key != reported:
                    self.channel.send(Stats(self.role, self.stats()))
                    reported = key
            timeout = 0.0 if busy else 0.01
            while self.channel.poll(timeout):
                msg = self.channel.recv()
                if isinstance(msg, Stop):
                    return
                if isinstance(msg, GetStats):
                    self.channel.send(Stats(self.role, self.stats()))
                else:
                    self.handle(msg)
                timeout = 0.0
            self.progress()

    def report(self, outputs: list[CoreOutput]) -> None:
        if outputs:
            self.channel.send(Outputs(self.role, outputs, self.core.gauges()))

    def stats(self) -> dict:
        return {**self.core.stats(), "kv_transfers": self.num_transfers, "kv_transfer_bytes": self.transfer_bytes,
                "pid": os.getpid()}


class CoreWorker(_Worker):
    """The whole engine core, async scheduling as configured: what `EngineCore` does in-process, in its own process."""
    role = "core"
    synchronous = False

    def busy(self) -> bool:
        return self.core.has_unfinished()

    def handle(self, msg) -> None:
        if isinstance(msg, Add):
            add_or_refuse(self, msg)
        elif isinstance(msg, Abort):
            self.core.abort(msg.request_ids)

    def progress(self) -> None:
        if self.core.has_unfinished():
            self.report(self.core.step())

    def stats(self) -> dict:
        return self.core.stats()  # what the in-process core reports (no KV transfers here)


def add_or_refuse(worker: _Worker, msg: Add) -> None:
    """Add a request to the worker's core; one it refuses ends at once ("abort"), and the others go on."""
    try:
        worker.core.add(msg.request)
    except ValueError as e:
        logger.warning("request %s refused: %s", msg.request.request_id, e)
        worker.report([CoreOutput(msg.request.request_id, [], None, finish_reason="abort", error=str(e))])


class PrefillWorker(_Worker):
    role = "prefill"

    def __init__(self, config: EngineConfig, channel: Channel):
        super().__init__(config, channel)
        self.offered: dict[str, Sequence] = {}  # waiting for the decode worker's accept or reject
        self.sending: deque[tuple[kv_transfer.Transfer, Sequence]] = deque()
        self.backpressure_steps = 0
        self.send_time_s = 0.0

    def busy(self) -> bool:
        return self.core.has_unfinished() or bool(self.sending)

    def handle(self, msg) -> None:
        if isinstance(msg, Add):
            add_or_refuse(self, msg)
        elif isinstance(msg, Abort):  # an offered sequence is the decode side's to drop
            self.core.abort([r for r in msg.request_ids if r not in self.offered])
        elif isinstance(msg, Accept):
            seq = self.offered.pop(msg.request_id)
            t0 = time.perf_counter()
            self.sending.append((kv_transfer.send_blocks(self.kv_cache, self.kv_blocks(seq), seq.request_id), seq))
            self.send_time_s += time.perf_counter() - t0
        elif isinstance(msg, Reject):
            self.core.free_blocks(self.offered.pop(msg.request_id))

    def kv_blocks(self, seq: Sequence) -> list[int]:
        return seq.block_table[: -(-seq.num_computed_tokens // self.config.kvcache_block_size)]

    def progress(self) -> None:
        while self.sending and self.sending[0][0].done():
            transfer, seq = self.sending.popleft()
            self.num_transfers += 1
            self.transfer_bytes += transfer.nbytes
            self.core.free_blocks(seq)
        if not self.core.has_unfinished():
            return
        if len(self.offered) >= self.config.pd_max_pending:
            self.backpressure_steps += 1  # the decode worker is full: stop prefilling, keep serving messages
            time.sleep(0.001)
            return
        outputs = self.core.step()
        self.report(outputs)
        for out in outputs:
            if out.finish_reason is not None:
                continue
            seq = self.core.detach(out.request_id)  # leaves this core with its blocks held until sent
            self.offered[seq.request_id] = seq
            digest = kv_transfer.digest(self.kv_cache[:, :, self.kv_blocks(seq)]) if self.config.pd_verify_kv \
                else None
            gen_state = None if seq.generator is None else bytes(seq.generator.get_state().tolist())
            self.channel.send(Offer(seq.request_id, seq.output_token_ids, seq.num_computed_tokens,
                                    seq.num_cached_tokens, gen_state, digest))

    def stats(self) -> dict:
        return {**super().stats(), "pending_offers": len(self.offered), "backpressure_steps": self.backpressure_steps,
                "kv_send_post_time_s": self.send_time_s}


class DecodeWorker(_Worker):
    role = "decode"

    def __init__(self, config: EngineConfig, channel: Channel):
        super().__init__(config, channel)
        self.offers: deque[Offer] = deque()
        self.receiving: deque[tuple[kv_transfer.Transfer, Sequence, str | None]] = deque()
        self.aborted: set[str] = set()
        self.deferred_admissions = 0
        self.kv_verified = 0

    def busy(self) -> bool:
        return self.core.has_unfinished() or bool(self.receiving) or bool(self.offers)

    def handle(self, msg) -> None:
        if isinstance(msg, Offer):
            self.offers.append(msg)
        elif isinstance(msg, Abort):
            for request_id in msg.request_ids:
                offer = next((o for o in self.offers if o.request_id == request_id), None)
                if offer is not None:
                    self.offers.remove(offer)
                    self.channel.send(Reject(request_id))  # the prefill worker frees its blocks
                elif any(t.request_id == request_id for t, _, _ in self.receiving):
                    self.aborted.add(request_id)
                else:
                    self.core.abort([request_id])

    def admit(self) -> None:
        """Take offers in order while the KV cache has room for them plus a block per running sequence."""
        core, bm = self.core, self.core.block_manager
        sched = core.scheduler
        while self.offers:
            offer = self.offers[0]
            request = offer.request
            in_flight = len(sched.running) + len(sched.waiting) + len(self.receiving)
            watermark = len(sched.running) + len(self.receiving)
            needed = -(-(len(request.prompt_token_ids) + len(offer.output_token_ids)) // bm.block_size)
            # Preempted sequences (waiting to be recomputed here) come before new arrivals.
            if sched.waiting or in_flight >= self.config.max_num_seqs or needed + watermark > bm.num_free_blocks:
                self.deferred_admissions += 1
                return
            self.offers.popleft()
            seq = Sequence(request.prompt_token_ids + offer.output_token_ids, request.sampling_params,
                           request.request_id, num_prompt_tokens=len(request.prompt_token_ids))
            seq.num_cached_tokens, seq.scheduled_time = offer.num_cached_tokens, time.time()
            if offer.generator_state is not None:  # continue the request's own random stream
                seq.generator = torch.Generator(device=core.runner.device)
                seq.generator.set_state(torch.tensor(list(offer.generator_state), dtype=torch.uint8))
            bm.allocate(seq, offer.num_computed_tokens)
            seq.num_computed_tokens = offer.num_computed_tokens
            # Accept first: NCCL's first p2p op between the two ranks blocks inside the call until the peer
            # joins (it sets up the connection), so the prefill side must be told to post its send first.
            self.channel.send(Accept(seq.request_id))
            self.receiving.append((kv_transfer.recv_blocks(self.kv_cache, list(seq.block_table), seq.request_id),
                                   seq, offer.kv_digest))

    def progress(self) -> None:
        self.admit()
        core = self.core
        while self.receiving and self.receiving[0][0].done():
            transfer, seq, digest = self.receiving.popleft()
            kv_transfer.finish_recv(self.kv_cache, transfer)
            self.num_transfers += 1
            self.transfer_bytes += transfer.nbytes
            if digest is not None:
                got = kv_transfer.digest(self.kv_cache[:, :, transfer.block_ids])
                if got != digest:
                    raise RuntimeError(f"KV transfer of {seq.request_id} corrupted: sent {digest}, received {got}")
                self.kv_verified += 1
            if seq.request_id in self.aborted:
                self.aborted.discard(seq.request_id)
                core.free_blocks(seq)
                continue
            core.attach(seq)
        blocked = not core.scheduler.running and self.receiving  # preempted ones wait for blocks in flight
        if core.has_unfinished() and not blocked:
            self.report(core.step())

    def stats(self) -> dict:
        return {**super().stats(), "pending_offers": len(self.offers), "receiving": len(self.receiving),
                "deferred_admissions": self.deferred_admissions, "kv_verified_transfers": self.kv_verified}
