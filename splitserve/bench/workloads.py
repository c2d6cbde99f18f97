"""The three workloads. Each returns a JSON-able dict; ratios are computed from numbers of the same run."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import torch
from tqdm.auto import tqdm

from splitserve.bench.timing import median_time
from splitserve.sampling_params import SamplingParams, StructuredOutputsParams
from splitserve.worker.decode_graphs import PLAIN
from splitserve.worker.inputs import fake_batch


def device_copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float | None:
    """Bytes read + written per second of a large device-to-device copy (the HBM ceiling), or None on CPU."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / float(np.median(times))


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def latency(llm, batch_sizes: list[int], context_lens: list[int], iters: int = 20) -> dict:
    """Decode step time at (batch, context): one engine step (inputs, graph replay, sampling) timed directly
    on the model runner, with random data in the KV cache. With the core's async scheduling on, steps are
    launched one ahead of their resolve, as the core does, so host work overlaps the previous step."""
    runner = llm.engine.core.runner
    overlap = getattr(llm.engine.core, "async_scheduling", False)
    bs = runner.block_size
    if runner.device.type == "cuda":
        runner.kv_cache.normal_()  # never time on zeros
    bandwidth = device_copy_bandwidth(runner.device)
    wbytes = weight_bytes(runner.model)
    kv_per_token = runner.kv_block_bytes() // bs
    points = []
    grid = [(b, c) for b in batch_sizes for c in context_lens]
    for batch, ctx in tqdm(grid, desc="latency", unit="point"):
        blocks_per_seq = -(-(ctx + 1) // bs)
        if batch * blocks_per_seq > runner.num_kv_blocks or ctx + 1 > llm.engine.max_model_len:
            points.append({"batch": batch, "ctx": ctx, "skipped": "does not fit the KV cache"})
            continue
        step = fake_batch(batch, ctx, bs, runner.num_kv_blocks)
        if overlap:  # as the async core: launch step i + 1, then wait for step i's tokens
            for _ in range(3):
                runner.execute(step)
            times, pending = [], runner.launch(step)
            for _ in range(iters):
                t0 = time.perf_counter()
                launched = runner.launch(step)
                runner.resolve(pending)
                pending = launched
                times.append(time.perf_counter() - t0)
            runner.resolve(pending)
            step_s = float(np.median(times))
        else:  # one step ends in a device sync anyway (sampled tokens to host)
            step_s = median_time(lambda step=step: runner.execute(step), runner.device, iters, warmup=3)
        bucket = runner.graphs.bucket_for(batch) if runner.graphs is not None else None
        point = {"batch": batch, "ctx": ctx, "ms_per_step": step_s * 1e3, "tok_s": batch / step_s,
                 "graph": bucket is not None}
        if bucket is not None:  # the graph alone, replayed back to back: GPU time without host gaps
            point["graph_gpu_ms"] = runner.graphs.time(PLAIN, bucket, ctx, iters)
        if bandwidth:
            bytes_read = wbytes + batch * ctx * kv_per_token
            point["roofline_ms"] = bytes_read / bandwidth * 1e3
            point["step_over_roofline"] = step_s / (bytes_read / bandwidth)
        points.append(point)
    return {"workload": "latency", "copy_bandwidth_GBps": bandwidth / 1e9 if bandwidth else None,
            "weight_bytes": wbytes, "async_scheduling": overlap, "points": points}


def random_requests(n: int, in_range: tuple[int, int], out_range: tuple[int, int], vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ins = rng.integers(in_range[0], in_range[1] + 1, n)
    outs = rng.integers(out_range[0], out_range[1] + 1, n)
    prompts = [rng.integers(0, vocab, k).tolist() for k in ins]
    return prompts, outs.tolist()


def throughput(llm, num_requests: int = 256, in_range=(100, 1024), out_range=(100, 1024), seed: int = 0) -> dict:
    prompts, out_lens = random_requests(num_requests, in_range, out_range, llm.engine.vocab_size, seed)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in out_lens]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm up
    before = llm.stats()  # the core's step times (in this process or its own)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    total = time.perf_counter() - t0
    after = llm.stats()
    prefill_s, decode_s = (after.get(k, 0.0) - before.get(k, 0.0)
                           for k in ("prefill_step_time_s", "decode_step_time_s"))
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"workload": "throughput", "num_requests": num_requests, "input_range": list(in_range),
            "output_range": list(out_range), "output_tokens": generated, "total_s": total,
            "output_tok_s": generated / total, "prefill_step_time_s": prefill_s,
            "decode_step_time_s": decode_s,
            "requests": {"input_lens": [len(p) for p in prompts], "output_lens": out_lens}}


def smallbatch(llm, num_prompts: int = 4, prompt_len: int = 32, new_tokens: int = 64, seed: int = 0) -> dict:
    """The original M1/M2 system's workload: decode tok/s = decode tokens / decode time."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, llm.engine.vocab_size, prompt_len).tolist() for _ in range(num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm up
    outs = llm.generate(prompts, params, use_tqdm=False)
    return {"workload": "smallbatch", "num_prompts": num_prompts, "prompt_len": prompt_len,
            "new_tokens": new_tokens, **decode_rate(outs), "ttft_s": max(o.metrics.time_to_first_token for o in outs)}


def decode_rate(outs) -> dict:
    """Decode tok/s of a batch: the tokens after the last request's first token, over the time from then to the
    last token. Requests that start a step apart (a core in its own process takes them in as they come) then
    count only where all of them decode."""
    first = max(o.metrics.first_token_time for o in outs)
    last = max(o.metrics.last_token_time for o in outs)
    tokens = sum(sum(t > first for t in o.metrics.token_times) for o in outs)
    return {"decode_s": last - first, "decode_tok_s": tokens / (last - first)}


# ---- sampling: decode tok/s with the logit processors on, against plain sampling in the same run ----
def _plain(n: int, tokenizer) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=0.95, max_tokens=n, ignore_eos=True)


def _penalties(n: int, tokenizer) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=0.95, max_tokens=n, ignore_eos=True, presence_penalty=0.5,
                          frequency_penalty=0.5, repetition_penalty=1.1, logit_bias={11: 1.0, 13: -1.0, 198: 0.5})


def json_schema(min_items: int) -> dict:
    """An array of objects (a string and an integer each) that cannot close before `min_items` items, each at
    least one token: with min_items >= max_tokens the output keeps its fixed length, on random weights too,
    with no bias, while the grammar masks every step."""
    item = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"]}
    return {"type": "array", "items": item, "minItems": min_items}


def _json(n: int, tokenizer) -> SamplingParams:
    if tokenizer is None:
        raise ValueError("mode 'json' needs a tokenizer: give --tokenizer DIR with --shape, or a model folder")
    return SamplingParams(temperature=1.0, top_p=0.95, max_tokens=n, ignore_eos=True,
                          structured_outputs=StructuredOutputsParams(json=json_schema(n)))


# The modes `bench sampling` runs: name -> SamplingParams for a fixed output length (no EOS).
SAMPLING_MODES = {"plain": _plain, "penalties": _penalties, "json": _json}


def check_sampling_modes(modes: list[str]) -> list[str]:
    """The modes to run, plain first (the ratios' denominator); ValueError naming any it cannot run."""
    for m in modes:
        if m not in SAMPLING_MODES:
            raise ValueError(f"unknown sampling mode {m!r}; supported: {', '.join(SAMPLING_MODES)}")
    return ["plain"] + [m for m in dict.fromkeys(modes) if m != "plain"]


def sampling(llm, modes: list[str], batch: int = 64, prompt_len: int = 256, new_tokens: int = 256,
             seed: int = 0, goal: float = 0.9, repeats: int = 1) -> dict:
    """Decode tok/s of one batch per mode (decode tokens / time from the last first token to the last token),
    each mode warmed up first, in `repeats` rounds that run every mode once (a drift of the machine, or outputs
    that wander into costlier grammar states, then touch every mode alike); a mode's number is its median round,
    and ratio = mode ÷ plain of the same run."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    modes = check_sampling_modes(modes)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, llm.engine.vocab_size, prompt_len).tolist() for _ in range(batch)]
    tokenizer, rounds = llm.get_tokenizer(), {m: [] for m in modes}
    for mode in modes:
        llm.generate(prompts, SAMPLING_MODES[mode](8, tokenizer), use_tqdm=False)  # warm up this mode's path
    for _ in range(repeats):
        for mode in modes:
            outs = llm.generate(prompts, SAMPLING_MODES[mode](new_tokens, tokenizer), use_tqdm=False)
            lengths = [len(o.outputs[0].token_ids) for o in outs]
            rounds[mode].append({
                **decode_rate(outs),
                # a row that ends early shrinks the batch: the ratio then understates that mode's speed
                "fixed_length": all(n == new_tokens for n in lengths), "min_output_tokens": min(lengths),
                "finish_reasons": dict(Counter(o.outputs[0].finish_reason for o in outs))})
    out = {}
    for mode, runs in rounds.items():
        median = sorted(runs, key=lambda r: r["decode_tok_s"])[(len(runs) - 1) // 2]  # a measured round
        out[mode] = {**median, "rounds_tok_s": [r["decode_tok_s"] for r in runs],
                     "fixed_length": all(r["fixed_length"] for r in runs)}
    for r in out.values():
        r["ratio_to_plain"] = r["decode_tok_s"] / out["plain"]["decode_tok_s"]
    goals = {m: {"ratio": r["ratio_to_plain"], "goal": goal, "met": r["ratio_to_plain"] >= goal}
             for m, r in out.items() if m != "plain"}
    return {"workload": "sampling", "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "repeats": repeats, "modes": out, "goals": goals}
