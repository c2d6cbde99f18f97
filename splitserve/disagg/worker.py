"""Prefill and decode worker processes (M1). Each runs a full core engine on its own device.

Prefill worker: schedules prompts (chunked, prefix-cached), samples the first token, reports it, and
offers the sequence to the decode worker. Prefill pauses while too many offers wait (backpressure).
Decode worker: admits an offer only when its KV cache has room, receives the blocks, and decodes the
sequence in its running batch (CUDA graphs as in the core); its own preemption recomputes locally.

Control messages are small tuples of ints/strings over a connection to the coordinator (no tensors);
KV goes straight from worker to worker over torch.distributed (kv_transfer.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
import traceback
from collections import deque
from multiprocessing.connection import Client

import torch

from splitserve.config import EngineConfig
from splitserve.disagg import kv_transfer
from splitserve.engine.detokenizer import IncrementalDetokenizer
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sequence import Sequence

logger = logging.getLogger("splitserve")


def worker_main(role: str, device: str, address, authkey: bytes, connect_timeout_s: float = 60.0) -> None:
    """Process entry point (spawned locally, or `splitserve pd-worker` on another host). The engine config
    and the rendezvous address come from the coordinator over the control connection. Ctrl-C is left to
    the coordinator, which stops the workers in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = _connect(address, authkey, connect_timeout_s)
    conn.send(("hello", role, os.getpid()))
    try:
        _, config, master_addr, master_port = conn.recv()
        torch_device = torch.device(device)
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        rank = kv_transfer.PREFILL_RANK if role == "prefill" else kv_transfer.DECODE_RANK
        kv_transfer.init_process_group(rank, torch_device, master_addr, master_port)
        worker = (PrefillWorker if role == "prefill" else DecodeWorker)(config, device, conn)
        conn.send(("ready", role, worker.stats()))
        worker.run()
    except (EOFError, ConnectionError):
        pass  # the coordinator is gone: nothing to report to
    except Exception:
        try:
            conn.send(("error", role, traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _connect(address, authkey: bytes, timeout_s: float):
    """A worker started by hand may come up before the coordinator listens: retry until the timeout."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return Client(address, authkey=authkey)
        except (ConnectionRefusedError, FileNotFoundError):
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def remote_worker_cli(argv: list[str] | None = None) -> None:
    """`splitserve pd-worker`: a decode worker on another host (see README, two hosts)."""
    import argparse

    parser = argparse.ArgumentParser(prog="splitserve pd-worker", allow_abbrev=False)
    parser.add_argument("--coordinator", required=True, help="HOST:PORT the coordinator listens on "
                                                             "(its pd_remote_decode)")
    parser.add_argument("--device", default="cuda:0", help="this host's device for the decode worker")
    parser.add_argument("--connect-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    key = os.environ.get("SPLITSERVE_PD_AUTHKEY")
    if not key:
        raise SystemExit("splitserve pd-worker: set SPLITSERVE_PD_AUTHKEY (the same secret as the coordinator's)")
    host, _, port = args.coordinator.rpartition(":")
    worker_main("decode", args.device, (host, int(port)), key.encode(), args.connect_timeout)


class _Worker:
    role = ""

    def __init__(self, config: EngineConfig, device: str, conn):
        self.conn = conn
        self.engine = LLMEngine(self.engine_config(config, device))
        self.kv_cache = self.engine.runner.kv_cache
        self.verify = config.pd_verify_kv
        self.sent: dict[str, list[int]] = {}  # request id -> [tokens, chars] already reported
        self.num_transfers = 0
        self.transfer_bytes = 0
        self.stopping = False

    def engine_config(self, config: EngineConfig, device: str) -> EngineConfig:
        return dataclasses.replace(config, device=device, enable_two_gpu_pd=False, prefill_device_id=None,
                                   decode_device_id=None, hf_config=None)

    def run(self) -> None:
        reported = None
        while not self.stopping:
            busy = self.busy()
            if not busy:  # idle: send the final counters once (transfers finish after the last report)
                key = (self.num_transfers, self.engine.num_steps, self.engine.scheduler.num_preemptions)
                if key != reported:
                    self.conn.send(("stats", self.role, self.stats()))
                    reported = key
            timeout = 0.0 if busy else 0.01
            while self.conn.poll(timeout):
                self.handle(self.conn.recv())
                timeout = 0.0
                if self.stopping:
                    return
            self.progress()

    def report(self, seqs: list[Sequence]) -> None:
        """Send each sequence's new tokens/text (text as (start, chunk): a stop string may cut it back)."""
        updates = []
        for seq in seqs:
            sent = self.sent.setdefault(seq.request_id, [0, 0])
            start = min(sent[1], len(seq.output_text))
            new_tokens = seq.output_token_ids[sent[0]:]
            logprobs = None if seq.logprobs is None else seq.logprobs[sent[0]:]
            updates.append((seq.request_id, new_tokens, start, seq.output_text[start:], logprobs,
                            seq.cumulative_logprob, seq.finish_reason, seq.stop_reason, seq.num_cached_tokens))
            sent[0], sent[1] = seq.num_output_tokens, len(seq.output_text)
            if seq.is_finished:
                self.sent.pop(seq.request_id, None)
                self.engine.release(seq)
        if updates:
            self.conn.send(("out", self.role, updates, self.stats()))

    def stats(self) -> dict:
        return {**self.engine.stats(), "max_model_len": self.engine.config.max_model_len,
                "kv_transfers": self.num_transfers, "kv_transfer_bytes": self.transfer_bytes, "pid": os.getpid()}


class PrefillWorker(_Worker):
    role = "prefill"

    def __init__(self, config: EngineConfig, device: str, conn):
        super().__init__(config, device, conn)
        self.offered: dict[str, Sequence] = {}  # waiting for the decode worker's accept or reject
        self.sending: deque[tuple[kv_transfer.Transfer, Sequence]] = deque()
        self.backpressure_steps = 0
        self.send_time_s = 0.0

    def engine_config(self, config: EngineConfig, device: str) -> EngineConfig:
        # Prefill never runs a decode batch: no decode graphs, no decode pipeline.
        return dataclasses.replace(super().engine_config(config, device), enforce_eager=True,
                                   enable_decode_pipeline=False, decode_attention_sm=None, decode_ffn_sm=None)

    def busy(self) -> bool:
        return self.engine.has_unfinished_requests() or bool(self.sending)

    def handle(self, msg) -> None:
        kind = msg[0]
        if kind == "add":
            _, request_id, token_ids, params, prompt = msg
            self.engine.add_sequence(Sequence(token_ids, params, prompt=prompt, request_id=request_id))
        elif kind == "abort":
            seq = self.engine.requests.get(msg[1])
            if seq is not None and msg[1] not in self.offered:  # an offered one is the decode side's to drop
                self.engine.abort(msg[1])
                self.engine.release(seq)
                self.sent.pop(msg[1], None)
        elif kind == "accept":
            seq = self.offered.pop(msg[1])
            t0 = time.perf_counter()
            self.sending.append((kv_transfer.send_blocks(self.kv_cache, self.kv_blocks(seq), seq.request_id), seq))
            self.send_time_s += time.perf_counter() - t0
        elif kind == "reject":
            self.release_blocks(self.offered.pop(msg[1]))
        elif kind == "stop":
            self.stopping = True

    def kv_blocks(self, seq: Sequence) -> list[int]:
        return seq.block_table[: -(-seq.num_computed_tokens // self.engine.config.kvcache_block_size)]

    def release_blocks(self, seq: Sequence) -> None:
        self.engine.block_manager.free_sequence(seq)  # full blocks stay in the prefix cache
        self.engine.release(seq)

    def progress(self) -> None:
        while self.sending and self.sending[0][0].done():
            transfer, seq = self.sending.popleft()
            self.num_transfers += 1
            self.transfer_bytes += transfer.nbytes
            self.release_blocks(seq)
        if not self.engine.has_unfinished_requests():
            return
        if len(self.offered) >= self.engine.config.pd_max_pending:
            self.backpressure_steps += 1  # the decode worker is full: stop prefilling, keep serving messages
            time.sleep(0.001)
            return
        updated = self.engine.step()
        self.report(updated)
        for seq in updated:
            if seq.is_finished:
                continue
            # Leaves this engine with its blocks held until the KV is sent.
            self.engine.scheduler.remove(seq)
            self.engine.detokenizers.pop(seq.seq_id, None)
            self.sent.pop(seq.request_id, None)
            self.offered[seq.request_id] = seq
            blocks = self.kv_blocks(seq)
            check = kv_transfer.digest(self.kv_cache[:, :, blocks]) if self.verify else None
            gen_state = None if seq.generator is None else bytes(seq.generator.get_state().tolist())
            self.conn.send(("offer", seq.request_id, seq.prompt_token_ids, seq.output_token_ids, seq.prompt,
                            seq.sampling_params, seq.num_computed_tokens, seq.output_text, seq.logprobs,
                            seq.cumulative_logprob, seq.num_cached_tokens, gen_state, check))

    def stats(self) -> dict:
        return {**super().stats(), "pending_offers": len(self.offered), "backpressure_steps": self.backpressure_steps,
                "kv_send_post_time_s": self.send_time_s}


class DecodeWorker(_Worker):
    role = "decode"

    def __init__(self, config: EngineConfig, device: str, conn):
        super().__init__(config, device, conn)
        self.offers: deque[tuple] = deque()
        self.receiving: deque[tuple[kv_transfer.Transfer, Sequence, str | None]] = deque()
        self.aborted: set[str] = set()
        self.deferred_admissions = 0
        self.kv_verified = 0

    def engine_config(self, config: EngineConfig, device: str) -> EngineConfig:
        blocks = config.pd_decode_num_kv_blocks or config.num_kv_blocks
        return dataclasses.replace(super().engine_config(config, device), num_kv_blocks=blocks)

    def busy(self) -> bool:
        return self.engine.has_unfinished_requests() or bool(self.receiving) or bool(self.offers)

    def handle(self, msg) -> None:
        kind = msg[0]
        if kind == "offer":
            self.offers.append(msg[1:])
        elif kind == "abort":
            request_id = msg[1]
            for offer in self.offers:
                if offer[0] == request_id:
                    self.offers.remove(offer)
                    self.conn.send(("reject", request_id))
                    return
            if any(t.request_id == request_id for t, _, _ in self.receiving):
                self.aborted.add(request_id)
                return
            seq = self.engine.requests.get(request_id)
            if seq is not None:
                self.engine.abort(request_id)
                self.engine.release(seq)
                self.sent.pop(request_id, None)
        elif kind == "stop":
            self.stopping = True

    def admit(self) -> None:
        """Take offers in order while the KV cache has room for them plus a block per running sequence."""
        engine, bm = self.engine, self.engine.block_manager
        sched = engine.scheduler
        while self.offers:
            (request_id, prompt_ids, output_ids, prompt, params, num_kv, text, logprobs, cumulative, cached,
             gen_state, check) = self.offers[0]
            in_flight = len(sched.running) + len(sched.waiting) + len(self.receiving)
            watermark = len(sched.running) + len(self.receiving)
            needed = -(-(len(prompt_ids) + len(output_ids)) // bm.block_size)
            # Preempted sequences (waiting to be recomputed here) come before new arrivals.
            if sched.waiting or in_flight >= engine.config.max_num_seqs or needed + watermark > bm.num_free_blocks:
                self.deferred_admissions += 1
                return
            self.offers.popleft()
            seq = Sequence(prompt_ids, params, prompt=prompt, request_id=request_id)
            seq.token_ids += output_ids
            seq.output_text, seq.cumulative_logprob, seq.num_cached_tokens = text, cumulative, cached
            if logprobs is not None:
                seq.logprobs = list(logprobs)
            if gen_state is not None:  # continue the request's own random stream where prefill left it
                seq.generator = torch.Generator(device=engine.runner.device)
                seq.generator.set_state(torch.tensor(list(gen_state), dtype=torch.uint8))
            bm.allocate(seq, num_kv)
            seq.num_computed_tokens = num_kv
            self.receiving.append((kv_transfer.recv_blocks(self.kv_cache, list(seq.block_table), request_id),
                                   seq, check))
            self.conn.send(("accept", request_id))

    def progress(self) -> None:
        self.admit()
        engine = self.engine
        while self.receiving and self.receiving[0][0].done():
            transfer, seq, check = self.receiving.popleft()
            kv_transfer.finish_recv(self.kv_cache, transfer)
            self.num_transfers += 1
            self.transfer_bytes += transfer.nbytes
            if check is not None:
                got = kv_transfer.digest(self.kv_cache[:, :, transfer.block_ids])
                if got != check:
                    raise RuntimeError(f"KV transfer of {seq.request_id} corrupted: sent {check}, received {got}")
                self.kv_verified += 1
            if seq.request_id in self.aborted:
                self.aborted.discard(seq.request_id)
                engine.block_manager.free_sequence(seq)
                continue
            engine.requests[seq.request_id] = seq
            detok = IncrementalDetokenizer(engine.tokenizer, seq.prompt_token_ids,
                                           seq.sampling_params.skip_special_tokens)
            for token in seq.output_token_ids:  # same state the prefill side had after its token(s)
                detok.step(token)
            engine.detokenizers[seq.seq_id] = detok
            self.sent[seq.request_id] = [seq.num_output_tokens, len(seq.output_text)]
            engine.scheduler.add_running(seq)
        blocked = not engine.scheduler.running and self.receiving  # preempted ones wait for blocks in flight
        if engine.has_unfinished_requests() and not blocked:
            self.report(engine.step())

    def stats(self) -> dict:
        return {**super().stats(), "pending_offers": len(self.offers), "receiving": len(self.receiving),
                "deferred_admissions": self.deferred_admissions, "kv_verified_transfers": self.kv_verified}
