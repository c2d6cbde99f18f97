"""A quick look at PD multiplexing on one GPU: build the engine with the mode on (its plan is calibrated and
printed), then run the same burst (decodes running, long prompts arriving) colocated and multiplexed, and print
per-token gaps. Not the benchmark (`splitserve bench pdmux` is): a probe to see the mode work at a real shape."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time

import numpy as np
import torch

from splitserve import LLM, SamplingParams
from splitserve.bench.shapes import shape_folder


def burst(llm: LLM, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    shorts = [engine.add_request(rng.integers(10, vocab - 10, 128).tolist(), params) for _ in range(48)]
    for _ in range(6):
        engine.step()
    longs = [engine.add_request(rng.integers(10, vocab - 10, int(n)).tolist(), params)
             for n in rng.integers(2048, 4096, 6)]
    times: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            times.setdefault(out.request_id, []).append(time.perf_counter())
    wall = time.perf_counter() - t0
    gaps = np.concatenate([np.diff(times[r.request_id]) for r in shorts if len(times.get(r.request_id, [])) > 1])
    ttft = [times[r.request_id][0] - t0 for r in longs]
    for r in shorts + longs:
        engine.release(r)
    return {"wall_s": wall, "itl_ms": {p: float(np.percentile(gaps, p) * 1e3) for p in (50, 90, 99, 99.9)},
            "long_ttft_s": [round(x, 3) for x in ttft], "stats": llm.stats().get("pd_multiplex")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--out", default="probe.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = shape_folder(args.shape)
    kw = dict(load_format="dummy", max_model_len=4700, max_num_seqs=128, gpu_memory_utilization=0.85)
    result = {"device": torch.cuda.get_device_name(0)}
    for name, extra in [("pdmux", dict(enable_pd_multiplex=True, max_num_batched_tokens=8192)),
                        ("colocated-2048", dict(max_num_batched_tokens=2048)),
                        ("colocated-8192", dict(max_num_batched_tokens=8192))]:
        t0 = time.perf_counter()
        llm = LLM(folder, **kw, **extra)
        start = time.perf_counter() - t0
        vocab = llm.engine.model.hf_config.vocab_size
        burst(llm, vocab, seed=1)  # warm-up
        r = burst(llm, vocab, seed=2)
        r["startup_s"] = round(start, 1)
        result[name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k != "stats"}), flush=True)
        if r["stats"] and r["stats"].get("plan"):
            print(r["stats"]["plan"], flush=True)
            print({k: v for k, v in r["stats"].items() if k != "plan"}, flush=True)
        llm.engine.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
