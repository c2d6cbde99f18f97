"""Online serving load: Poisson arrivals, per-request TTFT/TPOT, and the summary (percentiles, throughput,
goodput under an SLO). `http_load` drives a running OpenAI-compatible server with the official client;
`summarize` is shared with the in-process simulations (M1) so both report the same numbers."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class RequestRecord:
    prompt_len: int
    output_len: int  # tokens actually received
    ttft_s: float | None  # arrival (send) to first token
    tpot_s: float | None  # (last token - first token) / (output_len - 1)
    e2e_s: float | None
    error: str | None = None
    # in-process simulations with a timeline (pd.drive): seconds after the run's start
    arrival_s: float | None = None
    token_s: list[float] | None = None  # when each output token became visible: every inter-token gap


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send offsets in seconds; rate = inf sends everything at t=0."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return np.cumsum(gaps).tolist()


def summarize(records: list[RequestRecord], duration_s: float, slo_ttft_s: float, slo_tpot_s: float) -> dict:
    ok = [r for r in records if r.error is None]

    def pct(values: list[float]) -> dict:
        if not values:
            return {"p50": None, "p90": None, "p99": None, "mean": None}
        a = np.asarray(values)
        return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
                "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}

    good = [r for r in ok if r.ttft_s is not None and r.ttft_s <= slo_ttft_s
            and (r.tpot_s is None or r.tpot_s <= slo_tpot_s)]
    out_tokens = sum(r.output_len for r in ok)
    return {
        "num_requests": len(records), "num_errors": len(records) - len(ok), "duration_s": duration_s,
        "output_tok_s": out_tokens / duration_s, "request_s": len(ok) / duration_s,
        "goodput_request_s": len(good) / duration_s, "slo_attainment": len(good) / max(1, len(records)),
        "slo": {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s},
        "ttft_s": pct([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": pct([r.tpot_s for r in ok if r.tpot_s is not None]),
        "e2e_s": pct([r.e2e_s for r in ok if r.e2e_s is not None]),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


async def _one_request(client, model: str, prompt: list[int], max_tokens: int) -> RequestRecord:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and (chunk.choices[0].text or chunk.choices[0].finish_reason):
                first = first if first is not None else now
                last = now
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
    except Exception as e:  # a failed request is counted, not fatal to the run
        return RequestRecord(len(prompt), n, None, None, None, f"{type(e).__name__}: {e}")
    ttft = None if first is None else first - t0
    tpot = (last - first) / (n - 1) if first is not None and n > 1 else None
    return RequestRecord(len(prompt), n, ttft, tpot, None if last is None else last - t0)


async def http_load(base_url: str, model: str | None, prompts: list[list[int]], output_lens: list[int],
                    rate: float, max_concurrency: int | None = None, api_key: str | None = None,
                    seed: int = 0, progress: bool = True) -> tuple[list[RequestRecord], float]:
    """Send the requests at Poisson times; returns the records and the wall time of the whole run."""
    import openai
    from tqdm.auto import tqdm

    client = openai.AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key or "none", max_retries=0,
                                timeout=3600)
    if model is None:
        model = (await client.models.list()).data[0].id
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(prompts), desc=f"rate {rate}", disable=not progress, unit="req")

    async def send(offset: float, prompt: list[int], max_tokens: int) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        if limit is None:
            rec = await _one_request(client, model, prompt, max_tokens)
        else:
            async with limit:
                rec = await _one_request(client, model, prompt, max_tokens)
        bar.update(1)
        return rec

    offsets = poisson_arrivals(len(prompts), rate, seed)
    start = time.perf_counter()
    records = await asyncio.gather(*(send(o, p, m) for o, p, m in zip(offsets, prompts, output_lens)))
    duration = time.perf_counter() - start
    bar.close()
    await client.close()
    return list(records), duration


def serve_sweep(args) -> dict:
    """`splitserve bench serve`: one load run per request rate against --url."""
    from splitserve.bench.workloads import random_requests

    prompts, out_lens = random_requests(args.num_requests, tuple(args.input_range), tuple(args.output_range),
                                        vocab=args.prompt_vocab, seed=args.seed)
    prompts = [[t + 10 for t in p] for p in prompts]  # stay clear of special ids at the bottom of vocabularies
    runs = []
    for rate in args.request_rates:
        records, duration = asyncio.run(http_load(args.url, args.served_model_name, prompts, out_lens, rate,
                                                  args.max_concurrency, args.api_key, args.seed))
        summary = summarize(records, duration, args.slo_ttft, args.slo_tpot)
        runs.append({"request_rate": rate if math.isfinite(rate) else "inf", **summary,
                     "records": [asdict(r) for r in records]})
    return {"workload": "serve", "url": args.url, "input_range": args.input_range,
            "output_range": args.output_range, "max_concurrency": args.max_concurrency, "runs": runs}
