"""Does a grammar-mask fill in the fill threads run beside the engine thread's Python (the front end)? A fill of 32
rows inside a JSON string (Qwen tokenizer, bench sampling's schema) starts, the main thread runs ~2 ms of pure Python,
then waits for the fill; per switch interval used while a fill is in flight (structured_output.FILL_SWITCH_INTERVAL_S).
Also: two Python-busy threads at 5 and 0.1 ms (the cost of the lower interval). CPU only; needs .gpu/qwen-tokenizer.
Usage: python3 scripts/probe_fill_overlap.py"""
import concurrent.futures
import json
import sys
import threading
import time

import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from splitserve.bench.workloads import json_schema
from splitserve.engine import structured_output as so

tok = AutoTokenizer.from_pretrained(".gpu/qwen-tokenizer")
info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=151936)
g = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(json_schema(256)), any_whitespace=False)


class G:  # a SequenceGrammar's part the fill reads
    def __init__(self, m):
        self.matcher = m


grammars = []
for _ in range(32):
    m = xgr.GrammarMatcher(g)
    assert m.accept_string('[{"name": "ab')
    grammars.append(G(m))
mgr = so.StructuredOutputManager.__new__(so.StructuredOutputManager)
mgr.vocab_size, mgr.device, mgr._bitmask, mgr._fillers = 151936, torch.device("cpu"), None, None
mgr.fill_threads = 1
mgr._fill_pool = concurrent.futures.ThreadPoolExecutor(1)


def python_work(n=20000):
    x = 0
    for i in range(n):
        x += i * 2 % 7
    return x


t = time.perf_counter()
python_work()
print(f"python work alone {(time.perf_counter() - t) * 1e3:.2f} ms")
for interval in (5e-3, 1e-3, 5e-4, 1e-4):
    so.FILL_SWITCH_INTERVAL_S = interval
    alone, waits, work = [], [], []
    for _ in range(40):
        t = time.perf_counter()
        mgr.start_fill(grammars).result()
        alone.append(time.perf_counter() - t)
        f = mgr.start_fill(grammars)
        t = time.perf_counter()
        python_work()
        work.append(time.perf_counter() - t)
        t = time.perf_counter()
        f.result()
        waits.append(time.perf_counter() - t)
    for x in (alone, waits, work):
        x.sort()
    print(f"fill interval {interval * 1e3:.1f} ms: fill alone {alone[20] * 1e3:.2f} ms; python beside "
          f"{work[20] * 1e3:.2f} ms; then waited {waits[20] * 1e3:.2f} ms", flush=True)
# overhead: two Python-busy threads at a switch interval
for interval in (5e-3, 1e-4, 5e-3, 1e-4):
    sys.setswitchinterval(interval)

    def busy(out):
        t = time.perf_counter()
        for _ in range(50):
            python_work()
        out.append(time.perf_counter() - t)
    res = []
    ths = [threading.Thread(target=busy, args=(res,)) for _ in range(2)]
    t = time.perf_counter()
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    print(f"two busy Python threads, interval {interval * 1e3:.1f} ms: {(time.perf_counter() - t) * 1e3:.0f} ms",
          flush=True)
sys.setswitchinterval(5e-3)
