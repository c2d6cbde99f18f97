"""The engine thread's time per decode step, plain sampling against a JSON schema (cProfile), on a GPU: Qwen3-0.6B
shape, random weights, batch 64 x 256-token prompts, 192 new tokens. Needs a Qwen tokenizer in .gpu/qwen-tokenizer;
writes $OUT/prof-{mode}-{tottime,cumtime}.txt. Usage: OUT=dir python3 scripts/profile_sampling_host.py"""
import cProfile
import io
import os
import pstats
import time

import numpy as np

from splitserve import LLM
from splitserve.bench.shapes import shape_folder
from splitserve.bench.workloads import SAMPLING_MODES

folder = shape_folder("qwen3-0.6b", os.path.abspath(".gpu/qwen-tokenizer"))
llm = LLM(folder, load_format="dummy", gpu_memory_utilization=0.45)
tok = llm.get_tokenizer()
rng = np.random.default_rng(0)
prompts = [rng.integers(0, 150000, 256).tolist() for _ in range(64)]
out = os.environ.get("OUT", ".")
for mode in ["plain", "json"]:
    llm.generate(prompts, SAMPLING_MODES[mode](8, tok), use_tqdm=False)
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable()
    llm.generate(prompts, SAMPLING_MODES[mode](192, tok), use_tqdm=False)
    pr.disable()
    print(f"=== {mode}: {(time.perf_counter() - t) * 1e3 / 192:.3f} ms per step (incl. prefill)", flush=True)
    for key in ("tottime", "cumtime"):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(28)
        with open(f"{out}/prof-{mode}-{key}.txt", "w") as f:
            f.write(s.getvalue())
