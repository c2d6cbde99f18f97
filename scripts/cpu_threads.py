"""Decode step time of the default model on CPU at a given torch thread count (docs/CPU-THREADS.md).

    python3 scripts/cpu_threads.py [THREADS|auto|torch] [--steps N] [--batch B]

`torch` keeps torch's own default (one thread per core), `auto` is splitserve's default, a number is
`--cpu-threads N`. Prints one line: threads, median and p90 ms per decode step.
"""

import argparse
import statistics
import time

import torch

from splitserve import LLM, SamplingParams

parser = argparse.ArgumentParser()
parser.add_argument("threads", nargs="?", default="auto")
parser.add_argument("--steps", type=int, default=64)
parser.add_argument("--batch", type=int, default=1)
args = parser.parse_args()

torch_default = torch.get_num_threads()
threads = {"auto": None, "torch": torch_default}.get(args.threads)
threads = int(args.threads) if args.threads not in ("auto", "torch") else threads
llm = LLM(device="cpu", cpu_threads=threads)
engine = llm.engine
params = SamplingParams(temperature=0, max_tokens=args.steps + 1, ignore_eos=True)
seqs = [engine.add_request([1 + (i + j) % 1000 for j in range(32)], params) for i in range(args.batch)]
engine.step()  # prefill
times = []
while not all(s.is_finished for s in seqs):
    t0 = time.perf_counter()
    engine.step()
    times.append((time.perf_counter() - t0) * 1e3)
times.sort()
print(f"{args.threads:>5} threads={torch.get_num_threads()} (torch default {torch_default}) batch={args.batch} "
      f"decode ms/step: median {statistics.median(times):.1f} p90 {times[int(0.9 * (len(times) - 1))]:.1f} "
      f"({len(times)} steps)")
