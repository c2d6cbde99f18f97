"""HF transformers baselines for the same workloads, run in the same process (same GPU, same run)."""

from __future__ import annotations

import torch

from splitserve.bench.timing import median_time, timed


def hf_model(folder: str, device: torch.device, dtype: torch.dtype, random_weights: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    if random_weights:
        cfg = AutoConfig.from_pretrained(folder)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    return model.eval()


# HF peers: "hf" is transformers' static-cache `generate` as it comes (transformers 5.x compiles the decode
# forward by itself on CUDA with its default CompileConfig); "hf-compiled" is the gpt-fast recipe made explicit:
# StaticCache + torch.compile(mode="reduce-overhead", fullgraph=True), compile time kept out of the timings.
PEERS = ("hf", "hf-compiled")


def compile_config(mode: str, device: torch.device):
    """HF's own CompileConfig (the one `generate` uses for a static cache), or None for `mode` "none" (eager:
    the same StaticCache path without torch.compile, for CPU smoke tests)."""
    if mode == "none":
        return None
    from transformers import CompileConfig

    cfg = CompileConfig(fullgraph=True, mode=None if mode == "default" else mode)
    if device.type != "cuda":
        cfg._compile_all_devices = True  # transformers compiles only on accelerators unless told
    return cfg


@torch.no_grad()
def hf_smallbatch(model, prompts: list[list[int]], new_tokens: int, compile_mode: str | None = None) -> dict:
    """Static-cache `generate`, greedy, exactly `new_tokens` per prompt; decode time = time(new_tokens) -
    time(1 token). `compile_mode` None: transformers' default (the "hf" peer); else the explicit recipe.
    The first call (compilation, CUDA-graph recording) is timed on its own as `compile_s`."""
    device = model.device
    x = torch.tensor(prompts, device=device)
    extra = {}
    if compile_mode is not None:
        cfg = compile_config(compile_mode, device)
        extra = {"compile_config": cfg} if cfg is not None else {"disable_compile": True}

    def run(n):
        return timed(lambda: model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                            min_new_tokens=n, do_sample=False, cache_implementation="static",
                                            pad_token_id=0, **extra), device)[1]

    first = run(new_tokens)
    run(new_tokens)  # a second untimed call: recordings that depend on the cache object are done
    t_full, t_one = run(new_tokens), run(1)
    decode_s = t_full - t_one
    impl = "hf static cache generate" + (f" + compile ({compile_mode}, fullgraph)" if compile_mode else "")
    return {"impl": impl, "compile_mode": compile_mode or "transformers default", "decode_s": decode_s,
            "decode_tok_s": len(prompts) * (new_tokens - 1) / decode_s, "first_call_s": first,
            "compile_s": max(first - t_full, 0.0)}


def _cache_kwarg(model) -> str:
    """transformers renamed forward's `past_key_values` to `cache` (5.2x; the old name is deprecated)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def hf_decode_latency(model, batch: int, ctx: int, compile_mode: str, iters: int = 20, chunk: int = 512,
                      return_tokens: bool = False) -> dict:
    """gpt-fast's decode loop on HF: a StaticCache prefilled to `ctx` tokens (eager, in chunks), then decode
    steps of one token per sequence (the compiled forward, argmax fed back, tokens to the host), timed like our
    step (the same synchronized helper, median of `iters` after 3 warm-up steps). The cache moves on by one
    position per step (transformers 5.x's StaticCache keeps its own write position), so the steps see
    ctx .. ctx + iters + 3; HF's static attention reads all max_cache_len = ctx + iters + 4 positions every
    step, so each step costs that context. The warm-up (compilation, CUDA-graph recording) is timed on its
    own as `compile_s`."""
    from transformers import StaticCache

    device = model.device
    warmup = 3
    cache = StaticCache(config=model.config, max_cache_len=ctx + warmup + iters + 1)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch, ctx), generator=gen).to(device)
    kv = {_cache_kwarg(model): cache}
    for s in range(0, ctx, chunk):
        e = min(s + chunk, ctx)
        logits = model(input_ids=prompt[:, s:e], use_cache=True, logits_to_keep=1,
                       cache_position=torch.arange(s, e, device=device), **kv).logits
    cfg = compile_config(compile_mode, device)
    forward = model if cfg is None else model.get_compiled_call(cfg)
    state = {"token": logits[:, -1:].argmax(-1)}  # the first new token (greedy), fed at position ctx
    tokens = []
    position = torch.tensor([ctx], device=device)

    def step():
        logits = forward(input_ids=state["token"], cache_position=position, use_cache=True, **kv).logits
        state["token"] = logits[:, -1:].argmax(-1)
        position.add_(1)
        out = state["token"].tolist()
        tokens.append(out)
        return out

    _, warm_s = timed(lambda: [step() for _ in range(warmup)], device)
    step_s = median_time(step, device, iters)
    r = {"batch": batch, "ctx": ctx, "ms_per_step": step_s * 1e3, "compile_s": max(warm_s - warmup * step_s, 0.0)}
    if return_tokens:  # for tests: the prompt and each row's tokens from the steps, in order
        r["prompt"] = prompt.tolist()
        r["tokens"] = [[step_out[i][0] for step_out in tokens] for i in range(batch)]
    return r


@torch.no_grad()
def hf_throughput(model, prompts: list[list[int]], new_tokens: int) -> dict:
    """Continuous batching `generate_batch` with a fixed number of new tokens per request."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=-1)
    extra = {}
    if model.device.type == "cpu":
        # On CPU (without psutil) HF sizes its paged cache from the machine's whole memory and zero-fills it:
        # seconds to minutes before the first token. Give it the cache these requests need, all at once.
        try:
            from transformers import ContinuousBatchingConfig
        except ImportError:  # older transformers: no such knob
            pass
        else:
            page = ContinuousBatchingConfig.page_size
            pages = sum(-(-(len(p) + new_tokens) // page) for p in prompts)
            extra["continuous_batching_config"] = ContinuousBatchingConfig(num_blocks=pages + len(prompts) + 4)
    results, total = timed(lambda: model.generate_batch(inputs=prompts, generation_config=cfg, **extra),
                           model.device)
    generated = sum(len(r.generated_tokens) for r in results.values())
    return {"impl": "hf generate_batch", "num_requests": len(prompts), "new_tokens": new_tokens,
            "output_tokens": generated, "total_s": total, "output_tok_s": generated / total}
