"""Where a penalised or grammar-constrained decode step spends its time, against plain sampling (one GPU).

Runs `bench sampling`'s modes (batch 64, Qwen3-0.6B shape by default) under torch.profiler for a few decode
steps each and prints the top host and device ops per mode.
Usage: python3 scripts/profile_sampling.py [--tokenizer DIR] [--modes plain penalties json] [--out FILE]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from splitserve import LLM
from splitserve.bench.shapes import shape_folder
from splitserve.bench.workloads import SAMPLING_MODES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--modes", nargs="+", default=["plain", "penalties"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    llm = LLM(shape_folder(args.shape, args.tokenizer), load_format="dummy", max_num_seqs=args.batch)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, llm.engine.vocab_size, 256).tolist() for _ in range(args.batch)]
    tok, lines = llm.get_tokenizer(), []
    for mode in args.modes:
        llm.generate(prompts, SAMPLING_MODES[mode](8, tok), use_tqdm=False)  # warm up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts, SAMPLING_MODES[mode](48, tok), use_tqdm=False)
        for key in ("self_cpu_time_total", "self_cuda_time_total"):
            lines.append(f"==== {mode}: top by {key}")
            lines.append(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
