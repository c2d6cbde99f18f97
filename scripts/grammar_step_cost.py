"""Host cost of one decode step of a JSON-schema batch, piece by piece (issue 19), with the engine's own code.

    python3 scripts/grammar_step_cost.py --tokenizer DIR [--device cpu|cuda] [--batch 64] [--steps 256]

The batch is `bench sampling`'s json mode: every row has the bench's schema (an array of {name, age} objects
with minItems = the output length, so no row can close early) and its own matcher; DIR is a tokenizer folder
(Qwen's 151,936-token vocabulary for the bench's numbers). Each row walks its own output: at every step it takes
a token drawn uniformly from those its grammar allows, about what random weights at temperature 1 do, so the
rows sit where the bench's rows sit (mostly inside strings, the costliest masks).

At every step, on the same matcher states, it times for the whole batch (median / mean / p90 µs per step):
  resolve            EngineCore._append per row: accept_token, is_terminated, finish checks, the CoreOutput
  resolve, plain     the same for rows without a grammar (what every mode pays)
  fill               StructuredOutputManager.fill_bitmask, the engine's call with its default thread count
  mask copy          the bitmask's host-to-device copy call (pinned on cuda: enqueued, not waited for)
  inputs             ModelRunner._sampling_tensors: the other sampling inputs (every mode)
  apply              apply_bitmask on [B, V] logits (cuda: the launch call; cpu: the kernel itself)
  front end          RequestState.apply per row: incremental detokenization, metrics, stop strings (every mode)
and, on the same states, alternatives:
  accept loop/batch  accept_token + is_terminated per row, or xgrammar's batch_accept_token in one call
  fill, pool tN      fill_bitmask with N persistent fill threads (the calling thread fills one share)
  fill, xgr tN       xgrammar's BatchGrammarMatcher(max_threads=N): what the engine called before; it starts
                     and joins N threads on every call
  front end, wrapper the detokenizer decoding through tokenizer.decode (before) instead of the Rust backend
In async mode a grammar step's resolve, fill and copy run one after the other on the host while the device runs
the forward; the front end and the scheduler follow. The GPU idles once the loop's host time per step exceeds
the device's step (~3.5 ms at batch 64 for the Qwen3-0.6B shape on an H200: 18,362 tok/s plain).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import types

import numpy as np
import torch

from splitserve.bench.workloads import json_schema
from splitserve.engine.core import EngineCore
from splitserve.engine.messages import CoreOutput
from splitserve.engine.request_state import RequestState
from splitserve.engine.sequence import Sequence
from splitserve.engine.structured_output import StructuredOutputManager, apply_bitmask
from splitserve.models.loader import load_tokenizer
from splitserve.sampling_params import SamplingParams, StructuredOutputsParams
from splitserve.worker.model_runner import ModelRunner


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer folder (tokenizer.json ...)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=256, help="output tokens per row, all timed (the bench: 256)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936, help="the model's vocabulary (Qwen3: 151,936)")
    ap.add_argument("--eos", type=int, default=151645, help="the model's EOS id (Qwen3: <|im_end|>)")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="thread counts of the alternative fills (default: 1, 2, 4, 8, 16 up to the usable CPUs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import xgrammar as xgr

    dev = torch.device(args.device)
    cpus = usable_cpus()
    threads = args.threads or [n for n in (1, 2, 4, 8, 16) if n <= cpus]
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer is None:
        raise SystemExit(f"--tokenizer {args.tokenizer!r}: no tokenizer files there")
    B, V, rng = args.batch, args.vocab, np.random.default_rng(args.seed)

    # The engine's manager and matchers; two more matcher sets take the same tokens (each piece that accepts
    # needs its own matchers at the same state).
    manager = StructuredOutputManager(args.tokenizer, V, frozenset([args.eos]), dev)
    schema = StructuredOutputsParams(json=json_schema(args.steps))
    # one token more than the walk: no row reaches its length (finishing would need a scheduler)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=args.steps + 1, ignore_eos=True,
                            structured_outputs=schema)
    plain_params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=args.steps + 1, ignore_eos=True)
    t0 = time.perf_counter()
    first = manager.submit(schema)
    first.future.result()
    compile_ms = (time.perf_counter() - t0) * 1e3  # tokenizer analysis + compile, once per engine / schema
    prompts = [rng.integers(0, min(V, len(tokenizer)), args.prompt_len).tolist() for _ in range(B)]
    seqs, plain = [], []
    for p in prompts:
        seq = Sequence(p, params)
        seq.grammar = manager.submit(schema)  # the compiler's cache: the same compiled grammar
        seq.grammar.future.result()
        manager.make_ready(seq.grammar, [])
        seqs.append(seq)
        plain.append(Sequence(p, plain_params))
    compiled = first.future.result()
    loop_matchers = [xgr.GrammarMatcher(compiled) for _ in range(B)]
    batch_matchers = [xgr.GrammarMatcher(compiled) for _ in range(B)]
    raw_fill = {n: xgr.BatchGrammarMatcher(n) for n in threads}
    pooled = {n: StructuredOutputManager(args.tokenizer, V, frozenset([args.eos]), dev, fill_threads=n)
              for n in threads}  # only their fill is used: no compile

    # EngineCore._append and ModelRunner._sampling_tensors on stand-ins that hold only what they read.
    core = types.SimpleNamespace(model=types.SimpleNamespace(eos_token_ids=frozenset([args.eos])),
                                 max_model_len=1 << 20, requests={}, scheduler=None)
    runner = types.SimpleNamespace(device=dev, penalty_state=None, _bias_cache=None)
    runner._upload = lambda t: ModelRunner._upload(runner, t)
    requests = [RequestState(str(i), None, p, params, tokenizer) for i, p in enumerate(prompts)]
    wrapped = [RequestState(str(i), None, p, params, tokenizer) for i, p in enumerate(prompts)]
    for r in wrapped:  # the detokenizer as it was: every decode through transformers' wrapper
        r.detokenizer._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    logits = torch.randn(B, V, device=dev)

    times: dict[str, list[float]] = {}

    def timed(name: str, fn, *fn_args):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        out = fn(*fn_args)
        times.setdefault(name, []).append(time.perf_counter() - t)
        return out

    def resolve(rows, tokens):
        for seq, token in zip(rows, tokens):
            pos = len(seq.token_ids)
            seq.token_ids.append(token)
            EngineCore._append(core, seq, pos, token, None)

    def accept_loop(tokens):
        for m, token in zip(loop_matchers, tokens):
            if not m.accept_token(token):
                raise AssertionError(f"token {token} rejected")
            m.is_terminated()

    def accept_batch(tokens):
        if not all(xgr.BatchGrammarMatcher.batch_accept_token(batch_matchers, tokens)):
            raise AssertionError("a token was rejected")
        for m in batch_matchers:
            m.is_terminated()

    def raw_fill_call(batcher, grammars, out):
        batcher.batch_fill_next_token_bitmask([g.matcher for g in grammars], out)

    def mask_copy(bitmask):
        return bitmask.to(dev, non_blocking=True)

    def front_end(states, tokens):
        now = time.time()
        for r, token in zip(states, tokens):
            r.apply(CoreOutput(r.request_id, [token], None), now)

    grammars = [s.grammar for s in seqs]
    scratch = {n: torch.zeros_like(manager.fill_bitmask(grammars)[0]) for n in threads}
    fills = [("fill", manager.fill_bitmask, grammars)]
    fills += [(f"fill, pool t{n}", pooled[n].fill_bitmask, grammars) for n in threads]
    fills += [(f"fill, xgr t{n}", raw_fill_call, raw_fill[n], grammars, scratch[n]) for n in threads]
    apply_device = []
    for step in range(args.steps):
        for name, fn, *fn_args in fills[step % len(fills):] + fills[:step % len(fills)]:  # no fixed order
            out = timed(name, fn, *fn_args)
            if name == "fill":
                bitmask, _ = out  # the engine's own buffer: the other fills write their own
        if step % 16 == 0:
            others = [pooled[n].fill_bitmask(grammars)[0] for n in threads] + list(scratch.values())
            if not all(torch.equal(o, bitmask) for o in others):
                raise AssertionError("the alternative fills and the engine's disagree")
        timed("inputs", ModelRunner._sampling_tensors, runner, seqs, None)
        device_mask = timed("mask copy", mask_copy, bitmask)
        timed("apply", apply_bitmask, logits, device_mask, None)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            t = time.perf_counter()
            apply_bitmask(logits, device_mask, None)
            torch.cuda.synchronize(dev)
            apply_device.append(time.perf_counter() - t)
        # the next tokens: one allowed token per row, uniformly (not timed)
        allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :V]
        tokens = [int(rng.choice(np.flatnonzero(row))) for row in allowed]
        timed("resolve", resolve, seqs, tokens)
        timed("resolve, plain", resolve, plain, tokens)
        timed("accept loop", accept_loop, tokens)
        timed("accept batch", accept_batch, tokens)
        for name, states in [("front end", requests), ("front end, wrapper", wrapped)][::1 - 2 * (step % 2)]:
            timed(name, front_end, states, tokens)
        if any(s.finish_reason for s in seqs):
            raise AssertionError("a row finished early: the schema should keep every row open")

    print(f"batch {B}, {args.steps} steps, vocab {V}, device {dev}, {cpus} usable CPUs, torch threads "
          f"{torch.get_num_threads()}, engine fill threads {manager.fill_threads}; tokenizer analysis + schema "
          f"compile {compile_ms:.0f} ms (once)")
    print(f"sample row 0: {tokenizer.decode(seqs[0].output_token_ids[:40])!r}...")
    print(f"{'piece':<18} {'median us':>10} {'mean us':>10} {'p90 us':>10}")
    order = ["resolve", "resolve, plain", "fill", "mask copy", "inputs", "apply", "front end", "accept loop",
             "accept batch", *[f"fill, {kind} t{n}" for n in threads for kind in ("pool", "xgr")], "front end, wrapper"]
    for name in order:
        us = np.asarray(times[name]) * 1e6
        print(f"{name:<18} {np.median(us):10.0f} {us.mean():10.0f} {np.percentile(us, 90):10.0f}")
    if apply_device:
        print(f"{'apply (device)':<18} {statistics.median(apply_device) * 1e6:10.0f}")
    own = ["resolve", "fill", "mask copy"] + (["apply"] if dev.type == "cuda" else [])
    extra = sum(statistics.median(times[k]) for k in own) - statistics.median(times["resolve, plain"])
    print(f"the grammar's own host time per step ({' + '.join(own)} - resolve, plain; medians): {extra * 1e6:.0f} us")
    print(json.dumps({k: round(statistics.median(v) * 1e6) for k, v in times.items()}))
    for m in [manager, *pooled.values()]:
        m.shutdown()


if __name__ == "__main__":
    main()
