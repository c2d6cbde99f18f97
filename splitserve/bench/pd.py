"""`splitserve bench pd`: the M1 serving simulation on two devices, three setups in one run.

- colocated: one engine on device 0 gets every request;
- data_parallel: two colocated engines (devices 0 and 1, one process each), requests alternated;
- pd: prefill worker on device 0, decode worker on device 1.
Requests arrive as a Poisson process (same seed, so the same requests at the same times for every
setup); each setup's engine is driven in-process, exactly as the server's engine thread drives it.
Also measured: KV-transfer bandwidth vs the device-to-device copy bandwidth (P8), and the TTFT of one
4k-token prompt, colocated vs PD.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import time

import numpy as np
import torch

from splitserve.bench.serving import RequestRecord, poisson_arrivals, summarize
from splitserve.sampling_params import SamplingParams


def make_requests(n: int, in_range, out_range, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ins = rng.integers(in_range[0], in_range[1] + 1, n)
    outs = rng.integers(out_range[0], out_range[1] + 1, n)
    return [(rng.integers(10, vocab - 10, k).tolist(), int(m)) for k, m in zip(ins, outs)]


UNFINISHED = "unfinished: aborted at the end of the time box"


def drive(engine, requests, offsets: list[float], start_wall: float | None = None, stop_at: float | None = None,
          timeline: bool = False) -> list[RequestRecord]:
    """Feed requests at their arrival offsets, step until all finish; TTFT counts from the scheduled arrival.

    stop_at (seconds after the start) time-boxes the run: stepping stops there, requests still running are
    aborted (record error UNFINISHED, with the tokens they got) and those due later are never sent, so an
    overloaded rate costs no more time than any other. timeline: records keep the arrival and each output
    token's visible time (seconds after the start), for every inter-token gap."""
    start_wall = start_wall or time.time()
    horizon = math.inf if stop_at is None else stop_at
    seqs, i, n = [], 0, len(requests)
    while i < n or engine.has_unfinished_requests():
        now = time.time() - start_wall
        while i < n and offsets[i] <= min(now, horizon):  # those due before a stop are sent (and aborted)
            prompt, out_len = requests[i]
            seq = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True))
            seq.metrics.arrival_time = start_wall + offsets[i]
            seqs.append(seq)
            i += 1
        if now >= horizon:
            break
        if engine.has_unfinished_requests():
            engine.step()
        elif i < n:
            time.sleep(max(0.0, min(0.01, offsets[i] - (time.time() - start_wall), horizon - now)))
    unfinished = {seq.request_id for seq in seqs if not seq.is_finished}
    for request_id in unfinished:
        engine.abort(request_id)
    records = []
    for offset, seq in zip(offsets, seqs):
        m = seq.metrics
        k = seq.num_output_tokens
        ttft = None if m.first_token_time is None else m.first_token_time - m.arrival_time
        tpot = (m.last_token_time - m.first_token_time) / (k - 1) if k > 1 else None
        e2e = None if m.last_token_time is None else m.last_token_time - m.arrival_time
        rec = RequestRecord(seq.num_prompt_tokens, k, ttft, tpot, e2e,
                            UNFINISHED if seq.request_id in unfinished else None)
        if timeline:
            rec.arrival_s, rec.token_s = offset, [t - start_wall for t in m.token_times]
        records.append(rec)
        engine.release(seq)
    return records


def warm_up(engine, vocab: int) -> None:
    """Compile kernels and touch every prefill size class before anything is timed."""
    longest = min(4096, engine.max_model_len - 16)
    reqs = make_requests(6, (16, longest), (4, 8), vocab, seed=123)
    drive(engine, reqs, [0.0] * len(reqs))


def _colocated_proc(device: str, kwargs: dict, requests, schedule: list[tuple], barrier, results) -> None:
    """One colocated engine in its own process; `schedule`: per rate, (indices, offsets)."""
    from splitserve.config import EngineConfig
    from splitserve.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig.from_kwargs(**{**kwargs, "device": device}))
    warm_up(engine, engine.vocab_size)
    for rate_index, (indices, offsets) in enumerate(schedule):
        barrier.wait()
        start = time.time() + 0.2  # both processes start the clock at the same wall time
        t0 = time.time()
        records = drive(engine, [requests[i] for i in indices], offsets, start)
        results.put((device, rate_index, [r.__dict__ for r in records], time.time() - t0))


def run_colocated(devices: list[str], kwargs: dict, requests, arrivals_by_rate: list[list[float]]) -> list:
    """Returns, per rate, (records of all engines, duration). Requests alternate between the devices."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(devices)), ctx.Queue()
    procs = []
    for k, dev in enumerate(devices):
        schedule = []
        for arrivals in arrivals_by_rate:
            idx = list(range(k, len(requests), len(devices)))
            schedule.append((idx, [arrivals[i] for i in idx]))
        p = ctx.Process(target=_colocated_proc, args=(dev, kwargs, requests, schedule, barrier, results))
        p.start()
        procs.append(p)
    out = [([], 0.0) for _ in arrivals_by_rate]
    for _ in range(len(devices) * len(arrivals_by_rate)):
        while True:
            try:
                _, rate_index, recs, duration = results.get(timeout=1.0)
                break
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    for p in procs:
                        p.kill()
                    raise RuntimeError(f"a colocated engine process failed (exit code {dead[0].exitcode})") from None
        prev, prev_d = out[rate_index]
        out[rate_index] = (prev + [RequestRecord(**r) for r in recs], max(prev_d, duration))
    for p in procs:
        p.join()
    return out


def copy_bandwidth(src_dev: str, dst_dev: str, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy between two GPUs (the P8 reference)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=src_dev)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dst_dev)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(src_dev)
    torch.cuda.synchronize(dst_dev)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(src_dev)
        torch.cuda.synchronize(dst_dev)
        times.append(time.perf_counter() - t0)
    return nbytes / float(np.median(times))


def _transfer_proc(rank: int, devices: list[str], shape: tuple, num_tokens: int, block_size: int, store: str,
                   results) -> None:
    from splitserve.disagg import kv_transfer

    device = torch.device(devices[rank])
    torch.cuda.set_device(device)
    kv_transfer.init_process_group(rank, device, f"file://{store}")
    kv = torch.randn(shape, dtype=torch.bfloat16, device=device)
    nblocks = -(-num_tokens // block_size)
    blocks = np.random.default_rng(rank).permutation(shape[2])[:nblocks].tolist()  # scattered, like a real cache
    times = []
    for _ in range(8):
        torch.distributed.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if rank == kv_transfer.PREFILL_RANK:
            t = kv_transfer.send_blocks(kv, blocks, "bench")
            t.work.wait()
        else:
            t = kv_transfer.recv_blocks(kv, blocks, "bench")
            kv_transfer.finish_recv(kv, t)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if rank == kv_transfer.DECODE_RANK:
        results.put((t.nbytes, float(np.median(times[2:]))))
    torch.distributed.destroy_process_group()


def transfer_bandwidth(devices: list[str], shape: tuple, num_tokens: int, block_size: int) -> dict:
    """Our whole path for one sequence (gather, NCCL send/recv, scatter), timed on the receiver."""
    import tempfile

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = os.path.join(tempfile.mkdtemp(), "store")
    procs = [ctx.Process(target=_transfer_proc, args=(r, devices, shape, num_tokens, block_size, store, results))
             for r in (0, 1)]
    for p in procs:
        p.start()
    nbytes, seconds = results.get(timeout=600)
    for p in procs:
        p.join()
    return {"tokens": num_tokens, "bytes": nbytes, "seconds": seconds, "GBps": nbytes / seconds / 1e9}


def single_prompt_ttft(engine, vocab: int, prompt_len: int = 4096, repeats: int = 5) -> dict:
    """Idle-system TTFT and time to the second token of one long prompt (median of `repeats`)."""
    prompt_len = min(prompt_len, engine.max_model_len - 8)
    ttft, second = [], []
    for r in range(repeats):
        reqs = make_requests(1, (prompt_len, prompt_len), (2, 2), vocab, seed=1000 + r)
        seq = engine.add_request(reqs[0][0], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        while not seq.is_finished:
            engine.step()
        m = seq.metrics
        ttft.append(m.first_token_time - m.arrival_time)
        second.append(m.token_times[1] - m.arrival_time)
        engine.release(seq)
    return {"prompt_len": prompt_len, "ttft_s": float(np.median(ttft)), "second_token_s": float(np.median(second))}


def serving_kwargs(args) -> dict:
    """Engine kwargs of a serving simulation: the CLI's engine flags, a shape's random weights (or --model), and
    a max_model_len that holds the longest prompt and output."""
    from splitserve.bench.shapes import shape_folder
    from splitserve.cli import engine_kwargs

    kwargs = engine_kwargs(args)
    kwargs.pop("enable_two_gpu_pd", None)
    if args.shape:
        kwargs["model"] = shape_folder(args.shape)
        kwargs.setdefault("load_format", "dummy")
    elif args.model:
        kwargs["model"] = args.model
    kwargs.setdefault("max_model_len", args.input_range[1] + args.output_range[1] + 16)
    return kwargs


def pd_bench(args) -> dict:
    from splitserve.config import EngineConfig
    from splitserve.disagg.coordinator import pd_devices
    from splitserve.engine.engine import LLMEngine

    kwargs = serving_kwargs(args)
    p_dev, d_dev = pd_devices(EngineConfig.from_kwargs(**{**kwargs, "enable_two_gpu_pd": True}))
    probe = EngineConfig.from_kwargs(**kwargs)
    from splitserve.models.loader import load_hf_config, resolve_model

    hf = load_hf_config(resolve_model(probe.model))
    vocab = hf.vocab_size
    requests = make_requests(args.num_requests, args.input_range, args.output_range, vocab, seed=args.seed or 0)
    rates = [float(r) for r in args.request_rates]
    arrivals = [poisson_arrivals(len(requests), r, seed=(args.seed or 0) + 1) for r in rates]
    result = {"workload": "pd", "devices": [p_dev, d_dev], "num_requests": len(requests),
              "input_range": args.input_range, "output_range": args.output_range, "setups": {}}

    def runs_of(per_rate) -> list[dict]:
        return [{"request_rate": r if math.isfinite(r) else "inf",
                 **summarize(recs, dur, args.slo_ttft, args.slo_tpot)} for r, (recs, dur) in zip(rates, per_rate)]

    setups = args.setups
    if "colocated" in setups:
        result["setups"]["colocated"] = runs_of(run_colocated([p_dev], kwargs, requests, arrivals))
    if "data_parallel" in setups:
        result["setups"]["data_parallel"] = runs_of(run_colocated([p_dev, d_dev], kwargs, requests, arrivals))
    if "pd" in setups:
        engine = LLMEngine(EngineConfig.from_kwargs(**{**kwargs, "enable_two_gpu_pd": True}))
        try:
            warm_up(engine, vocab)
            per_rate = []
            for offsets in arrivals:
                t0 = time.time()
                recs = drive(engine, requests, offsets)
                per_rate.append((recs, time.time() - t0))
            result["setups"]["pd"] = runs_of(per_rate)
            result["pd_single_prompt"] = single_prompt_ttft(engine, vocab)
            result["pd_stats"] = engine.stats()
        finally:
            engine.shutdown()
    if p_dev.startswith("cuda"):
        engine = LLMEngine(EngineConfig.from_kwargs(**{**kwargs, "device": p_dev}))
        warm_up(engine, vocab)
        result["colocated_single_prompt"] = single_prompt_ttft(engine, vocab)
        runner = engine.core.runner
        shape = (2, runner.num_layers, 512, runner.block_size, runner.num_kv_heads, runner.head_dim)
        del engine, runner
        torch.cuda.empty_cache()
        result["copy_GBps"] = copy_bandwidth(p_dev, d_dev) / 1e9
        result["kv_transfer"] = transfer_bandwidth([p_dev, d_dev], shape, 4096, shape[3])
        result["kv_transfer"]["fraction_of_copy"] = result["kv_transfer"]["GBps"] / result["copy_GBps"]
    result["goals"] = goals(result)
    return result


def goals(r: dict) -> dict:
    """P7 at the rate where data-parallel reaches 80% of its peak throughput; P8 from the transfer numbers."""
    out: dict = {}
    dp, pd = r["setups"].get("data_parallel"), r["setups"].get("pd")
    if dp and pd:
        peak = max(run["output_tok_s"] for run in dp)
        at = next(i for i, run in enumerate(dp) if run["output_tok_s"] >= 0.8 * peak)
        dp_p99, pd_p99 = dp[at]["tpot_s"]["p99"], pd[at]["tpot_s"]["p99"]
        out["P7"] = {"rate": dp[at]["request_rate"], "dp_peak_output_tok_s": peak,
                     "dp_tpot_p99_s": dp_p99, "pd_tpot_p99_s": pd_p99,
                     "tpot_p99_ratio": pd_p99 / dp_p99 if dp_p99 and pd_p99 else None,
                     "dp_goodput": dp[at]["goodput_request_s"], "pd_goodput": pd[at]["goodput_request_s"]}
        ratio = out["P7"]["tpot_p99_ratio"]
        out["P7"]["met"] = bool(ratio is not None and ratio <= 0.5
                                and out["P7"]["pd_goodput"] >= out["P7"]["dp_goodput"])
    if "kv_transfer" in r:
        frac = r["kv_transfer"]["fraction_of_copy"]
        pd1, co1 = r.get("pd_single_prompt"), r.get("colocated_single_prompt")
        ttft_ratio = pd1["ttft_s"] / co1["ttft_s"] if pd1 and co1 else None
        out["P8"] = {"transfer_fraction_of_copy": frac, "ttft_4k_pd_over_colocated": ttft_ratio,
                     "met": bool(frac >= 0.7 and ttft_ratio is not None and ttft_ratio <= 1.05)}
    return out
