"""Host cost of the penalty inputs per decode step: `ModelRunner._penalty_tensors` called directly.

Batch 64, 512-token prompts, outputs growing by one token per step, Qwen3's vocabulary (151,936), all four
processors on (presence, frequency, repetition, a small logit_bias). On CPU the [B, V] work is host work too,
so the number is the whole cost of the call. Usage: python3 scripts/penalty_host_cost.py [--device cuda]
"""

import argparse
import statistics
import time
import types

import numpy as np
import torch

from splitserve.engine.sequence import Sequence
from splitserve.sampling_params import SamplingParams
from splitserve.worker.model_runner import ModelRunner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--outputs", type=int, nargs="+", default=[0, 128, 512, 1024], help="output lengths measured")
    ap.add_argument("--steps", type=int, default=20, help="steps timed at each output length")
    ap.add_argument("--shuffle", action="store_true", help="a new batch order every step (no consecutive rows)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    runner = types.SimpleNamespace(vocab_size=args.vocab, device=dev, eos_token_ids=(151645,),
                                   _to_device=lambda a: torch.from_numpy(a).to(dev), penalty_state=None,
                                   _bias_cache=None)
    runner._bias_tensors = lambda biased: ModelRunner._bias_tensors(runner, biased)
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=1.0, top_p=0.95, presence_penalty=0.5, frequency_penalty=0.5,
                            repetition_penalty=1.1, logit_bias={11: 1.0, 13: -1.0, 198: 0.5}, ignore_eos=True)
    seqs = [Sequence(rng.integers(0, args.vocab, args.prompt_len).tolist(), params) for _ in range(args.batch)]
    step = 0
    print(f"batch {args.batch}, prompt {args.prompt_len}, vocab {args.vocab}, device {dev}")
    for target in args.outputs:
        while seqs[0].num_output_tokens < target:  # grow (through the call, as the engine would)
            ModelRunner._penalty_tensors(runner, seqs)
            for s in seqs:
                s.token_ids.append(int(rng.integers(0, args.vocab)))
            step += 1
        times = []
        for _ in range(args.steps):
            if args.shuffle:
                rng.shuffle(seqs)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            ModelRunner._penalty_tensors(runner, seqs)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
            for s in seqs:
                s.token_ids.append(int(rng.integers(0, args.vocab)))
        print(f"output {target:5d}: {statistics.median(times) * 1e6:9.0f} us per step (median of {args.steps})")


if __name__ == "__main__":
    main()
