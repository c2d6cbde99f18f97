"""HF transformers baselines for the same workloads, run in the same process (same GPU, same run)."""

from __future__ import annotations

import time

import torch


def hf_model(folder: str, device: torch.device, dtype: torch.dtype, random_weights: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    if random_weights:
        cfg = AutoConfig.from_pretrained(folder)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    return model.eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def hf_smallbatch(model, prompts: list[list[int]], new_tokens: int) -> dict:
    """Static-cache `generate`; decode time = time(new_tokens) - time(1 token)."""
    device = model.device
    x = torch.tensor(prompts, device=device)

    def run(n):
        _sync(device)
        t0 = time.perf_counter()
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       cache_implementation="static", pad_token_id=0)
        _sync(device)
        return time.perf_counter() - t0

    run(new_tokens)
    t_full, t_one = run(new_tokens), run(1)
    decode_s = t_full - t_one
    return {"impl": "hf static cache generate", "decode_s": decode_s,
            "decode_tok_s": len(prompts) * (new_tokens - 1) / decode_s}


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
    _sync(model.device)
    t0 = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=cfg, **extra)
    _sync(model.device)
    total = time.perf_counter() - t0
    generated = sum(len(r.generated_tokens) for r in results.values())
    return {"impl": "hf generate_batch", "num_requests": len(prompts), "new_tokens": new_tokens,
            "output_tokens": generated, "total_s": total, "output_tok_s": generated / total}
