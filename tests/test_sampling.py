"""Sampling checked against HF transformers' logits for the same weights (the oracle)."""

import pytest
import torch
from conftest import random_prompts

from splitserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def peaked(make_tiny_model):
    path = make_tiny_model("qwen3", seed=2, initializer_range=0.3)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, LLM(path, kvcache_block_size=8), hf


def hf_step_logits(hf, prompt, generated):
    with torch.no_grad():
        x = torch.tensor([prompt + generated])
        return hf(x).logits[0, len(prompt) - 1: len(prompt) + len(generated) - 1].float()


def check_allowed(peaked, params, allowed_fn):
    path, llm, hf = peaked
    prompts = random_prompts(4, 5, 20, seed=21)
    outs = llm.generate(prompts, params, use_tqdm=False)
    sizes = []
    for prompt, out in zip(prompts, outs):
        gen = out.outputs[0].token_ids
        logits = hf_step_logits(hf, prompt, gen)
        for step, token in enumerate(gen):
            allowed = allowed_fn(logits[step] / params.temperature)
            sizes.append(int(allowed.sum()))
            assert allowed[token], f"step {step}: token {token} is excluded"
    return sizes


def test_top_k_never_emits_excluded(peaked):
    sizes = check_allowed(peaked, SamplingParams(temperature=1.0, top_k=3, max_tokens=24, ignore_eos=True),
                          lambda lg: lg >= lg.topk(3).values[-1])
    assert max(sizes) == 3


def test_top_p_never_emits_excluded(peaked):
    def allowed(lg):
        probs = lg.softmax(-1)
        sorted_p, order = probs.sort(descending=True)
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < 0.6
        return torch.zeros_like(probs, dtype=torch.bool).scatter(0, order, keep_sorted)

    sizes = check_allowed(peaked, SamplingParams(temperature=0.7, top_p=0.6, max_tokens=24, ignore_eos=True),
                          allowed)
    assert min(sizes) < 49152 // 2  # the constraint actually excludes tokens


def test_min_p_never_emits_excluded(peaked):
    def allowed(lg):
        probs = lg.softmax(-1)
        return probs >= 0.2 * probs.max()

    sizes = check_allowed(peaked, SamplingParams(temperature=1.0, min_p=0.2, max_tokens=24, ignore_eos=True),
                          allowed)
    assert min(sizes) < 100


def test_top_k_top_p_min_p_compose_in_vllm_order():
    """top-k, then top-p over what top-k kept (renormalised), then min-p: the sampler's kept tokens per row against a
    float64 oracle that sorts and renormalises at each stage, rows using none, some or all of them."""
    from splitserve.layers.sampler import SamplingTensors, filter_probs

    g = torch.Generator().manual_seed(5)
    B, V = 6, 300
    probs = (torch.randn(B, V, generator=g) * 3).softmax(-1)
    top_k = torch.tensor([0, 5, 50, 0, 20, 300])
    top_p = torch.tensor([0.9, 1.0, 0.7, 0.5, 0.95, 1.0])
    min_p = torch.tensor([0.0, 0.1, 0.05, 0.0, 0.2, 0.0])
    st = SamplingTensors(torch.ones(B), top_k, top_p, min_p, [None] * B, False, int(top_k.max()), True, True, None,
                         any_greedy=False)
    kept = filter_probs(probs, st) > 0
    for r in range(B):
        p = probs[r].double()
        order = p.argsort(descending=True)
        keep = torch.ones(V, dtype=torch.bool)
        if top_k[r] > 0:
            keep[order[int(top_k[r]):]] = False
        q = torch.where(keep, p, 0.0)
        sq = (q / q.sum())[order]
        keep[order[(sq.cumsum(0) - sq) >= float(top_p[r])]] = False
        keep &= p >= float(min_p[r]) * p.max()
        assert torch.equal(kept[r], keep), (r, int(kept[r].sum()), int(keep.sum()))
    assert kept.sum(-1).tolist() != [V] * B and kept[5].all()  # the filters cut, and a row with none keeps all


def test_greedy_rows_beside_sampled_rows_take_hf_argmax(peaked):
    """A batch of greedy and sampled rows: each greedy row's tokens are HF's argmax at every step (the sampler
    makes the greedy choice per row only when the batch has a greedy row)."""
    path, llm, hf = peaked
    prompts = random_prompts(4, 5, 20, seed=22)
    params = [SamplingParams(temperature=t, top_p=0.9, max_tokens=16, ignore_eos=True) for t in (0, 1.0, 0, 0.8)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out, p in zip(prompts, outs, params):
        if p.temperature == 0:
            gen = out.outputs[0].token_ids
            assert gen == hf_step_logits(hf, prompt, gen).argmax(-1).tolist()


def test_seeded_runs_reproduce_and_do_not_depend_on_the_batch(peaked):
    _, llm, _ = peaked
    prompt = random_prompts(1, 10, 10, seed=23)[0]
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=24, ignore_eos=True)
    a = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    others = random_prompts(5, 5, 30, seed=24)
    batch = llm.generate([prompt] + others, [params] + [SamplingParams(temperature=1.0, max_tokens=20)] * 5,
                         use_tqdm=False)
    assert batch[0].outputs[0].token_ids == a
    c = llm.generate([prompt], SamplingParams(temperature=1.0, seed=99, max_tokens=24, ignore_eos=True),
                     use_tqdm=False)[0].outputs[0].token_ids
    assert c != a


def test_logprobs_match_hf(peaked):
    _, llm, hf = peaked
    prompt = random_prompts(1, 12, 12, seed=25)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    ref = hf_step_logits(hf, prompt, out.token_ids).log_softmax(-1)
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        top = ref[step].topk(3)
        assert set(entry) == set(top.indices.tolist()) | {token}
        for tid, lp in entry.items():
            assert abs(lp.logprob - ref[step, tid].item()) < 1e-4
            assert lp.rank == int((ref[step] > ref[step, tid]).sum()) + 1  # vLLM's Logprob: rank 1 = most likely
            assert lp.decoded_token == llm.get_tokenizer().decode([tid])
    assert abs(out.cumulative_logprob - sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs))) < 1e-5


def test_stop_strings_cut_exactly_and_finish_reasons(default_llm):
    llm = default_llm
    prompt = "Once upon a time, in a city of robots,"
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 40
    stop = full.text[25:29]
    cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, stop=[stop]), use_tqdm=False)[0]
    c = cut.outputs[0]
    assert c.text == full.text[: full.text.find(stop)]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.token_ids == full.token_ids[: len(c.token_ids)] and len(c.token_ids) < 40
    stop_tok = full.token_ids[6]
    s = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_tok]),
                     use_tqdm=False)[0].outputs[0]
    assert s.token_ids == full.token_ids[: full.token_ids.index(stop_tok) + 1]
    assert s.finish_reason == "stop" and s.stop_reason == stop_tok
    # EOS ends a chat answer unless ignore_eos
    chat = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=64),
                    use_tqdm=False)[0].outputs[0]
    assert chat.finish_reason == "stop" and chat.token_ids[-1] in llm.engine.model.eos_token_ids
