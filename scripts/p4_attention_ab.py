"""P4's step with decode attention's large-batch tiles on and off, in one process (Qwen3-8B, batch 256, ctx 2048):
for each, the graph alone, then the engine step (bench.workloads.latency), then the graph alone again, so that
the order of the two measurements shows. Usage: python scripts/p4_attention_ab.py OUT_JSON
"""

import json
import sys

sys.path.insert(0, "scripts")
from gpu_fused_ab import recapture  # noqa: E402

from splitserve import LLM  # noqa: E402
from splitserve.bench import workloads  # noqa: E402
from splitserve.bench.shapes import shape_folder  # noqa: E402
from splitserve.kernels import paged_attention  # noqa: E402
from splitserve.worker.decode_graphs import PLAIN  # noqa: E402

llm = LLM(shape_folder("qwen3-8b"), load_format="dummy", max_num_seqs=256, max_model_len=2049)
runner = llm.engine.core.runner
result = {}
for name, programs in [("large_tiles", 1024), ("16key_tiles", 1 << 30), ("large_tiles_again", 1024)]:
    paged_attention.LARGE_DECODE_PROGRAMS = programs
    recapture(llm, True)
    before = runner.graphs.time(PLAIN, 256, 2048, 20)
    point = workloads.latency(llm, [256], [2048])["points"][0]
    after = runner.graphs.time(PLAIN, 256, 2048, 20)
    result[name] = {"graph_ms_before": before, "graph_ms_after": after, **point}
    print(name, f"graph {before:.3f} | step {point['ms_per_step']:.3f} (graph {point['graph_gpu_ms']:.3f}, "
          f"x{point['step_over_roofline']:.3f} roofline) | graph {after:.3f}", flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(result, f, indent=1)
