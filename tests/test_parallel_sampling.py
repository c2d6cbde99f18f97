"""n > 1 (completions share the prompt's KV), prompt_logprobs, and vLLM's Logprob objects.

References: a single request with the completion's own seed (n > 1: "each completion equals a single request
with that sequence's seed"), HF transformers' fp32 logits of the same weights (prompt_logprobs), and the KV
cache's own block accounting (the prompt is prefilled once; every block comes back)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

from splitserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_model):
    return make_tiny_model("qwen3", seed=11)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(tiny_dir, kvcache_block_size=8, max_num_batched_tokens=64)


def _count_computed_tokens(llm) -> list[int]:
    """Spy on the runner: the number of tokens each step computes (prefill chunks and decodes)."""
    runner, counts = llm.engine.core.runner, []
    launch = runner.launch

    def counting(batch, *args, **kw):
        counts.append(batch.num_tokens)
        return launch(batch, *args, **kw)

    runner.launch = counting
    return counts


def _single(llm, prompt, seed, **kw) -> list[int]:
    params = SamplingParams(temperature=1.0, seed=seed, ignore_eos=True, **kw)
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("prompt_len", [37, 40, 41])  # 37: a partly filled last block; 40, 41: block edges (8)
def test_n_prefills_the_prompt_once_and_each_completion_is_its_seeds_single_request(tiny_dir, prompt_len):
    llm = LLM(tiny_dir, kvcache_block_size=8, max_num_batched_tokens=64, enable_prefix_caching=False)
    prompt = random_prompts(1, prompt_len, prompt_len, seed=prompt_len)[0]
    n, max_tokens = 4, 10
    counts = _count_computed_tokens(llm)
    out = llm.generate([prompt], SamplingParams(n=n, temperature=1.0, seed=100, max_tokens=max_tokens,
                                                ignore_eos=True), use_tqdm=False)[0]
    # without prefix caching, only the fork can share: the prompt once, each other completion its last token
    assert sum(counts) == prompt_len + (n - 1) + n * (max_tokens - 1)
    assert [o.index for o in out.outputs] == list(range(n))
    assert llm.stats()["kv_used_blocks"] == 0
    counts.clear()
    singles = [_single(llm, prompt, 100 + i, max_tokens=max_tokens) for i in range(n)]
    assert sum(counts) == n * (prompt_len + max_tokens - 1)  # the reference really prefilled n times
    assert [o.token_ids for o in out.outputs] == singles
    assert len({tuple(s) for s in singles}) == n  # the seeds differ, so the comparison means something


def test_n_with_greedy_gives_equal_completions_with_logprobs(llm):
    prompt = random_prompts(1, 20, 20, seed=3)[0]
    out = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=8, logprobs=2, ignore_eos=True),
                       use_tqdm=False)[0]
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    for o in out.outputs:
        assert o.token_ids == ref.token_ids
        for mine, theirs in zip(o.logprobs, ref.logprobs, strict=True):
            assert mine.keys() == theirs.keys()
            assert [mine[t].logprob for t in theirs] == pytest.approx([lp.logprob for lp in theirs.values()], abs=1e-5)


def test_n_under_preemption_and_with_many_prompts_matches_singles(tiny_dir):
    # 12 KV blocks of 8 tokens: 3 prompts x 3 completions of ~40 tokens cannot all fit; preemption must recompute
    llm = LLM(tiny_dir, kvcache_block_size=8, max_num_batched_tokens=64, num_kv_blocks=14)
    prompts = random_prompts(3, 10, 16, seed=9)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.stats()["num_preemptions"] > 0
    assert llm.stats()["kv_used_blocks"] == 0
    roomy = LLM(tiny_dir, kvcache_block_size=8, max_num_batched_tokens=64)
    for prompt, out in zip(prompts, outs):
        assert [o.token_ids for o in out.outputs] == [_single(roomy, prompt, 7 + i, max_tokens=24) for i in range(3)]


def test_aborting_the_first_completion_leaves_the_others_whole(llm):
    prompt = random_prompts(1, 30, 30, seed=4)[0]
    engine = llm.engine
    completions = engine.make_requests(prompt, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6,
                                                              ignore_eos=True))
    for c in completions:
        engine.add(c)
    engine.abort(completions[0].request_id)  # before the fork: the others must prefill on their own
    while engine.has_unfinished_requests():
        engine.step()
    for c in completions:
        engine.release(c)
    assert completions[0].finish_reason == "abort"
    assert [c.output_token_ids for c in completions[1:]] == [_single(llm, prompt, 5 + i, max_tokens=6)
                                                              for i in (1, 2)]
    assert llm.stats()["kv_used_blocks"] == 0


def test_bad_n_and_seed_overflow_are_rejected_before_work():
    for bad in (0, -1, 129, 2.0, True):
        with pytest.raises(ValueError, match="n must"):
            SamplingParams(n=bad)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(n=2, seed=2**63 - 1)  # completion 1 would take seed 2**63
    SamplingParams(n=2, seed=2**63 - 2)


def _hf_logprobs(tiny_dir, prompt) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)


def test_prompt_logprobs_match_hf_across_chunks_prefix_hits_and_preemption(tiny_dir, llm):
    prompt = random_prompts(1, 150, 150, seed=8)[0]  # 150 tokens, chunks of 64: three prefill steps
    ref = _hf_logprobs(tiny_dir, prompt)
    k = 3
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # fill the prefix cache
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=k), use_tqdm=False)[0]
    got = out.prompt_logprobs
    assert len(got) == len(prompt) and got[0] is None
    tok = llm.get_tokenizer()
    for pos in range(1, len(prompt)):
        row, token = ref[pos - 1], prompt[pos]  # position p - 1 predicts prompt token p
        top = row.topk(k)
        assert set(got[pos]) == {token} | set(top.indices.tolist())
        for tid, lp in got[pos].items():
            assert abs(lp.logprob - row[tid].item()) < 1e-4
            # rank 1 = most likely; tokens within float noise of this one (1e-4) may fall either side of it
            v = row[tid].item()
            assert int((row > v + 1e-4).sum()) + 1 <= lp.rank <= int((row > v - 1e-4).sum()) + 1
            assert lp.decoded_token == tok.decode([tid])
    # a small cache: the request is preempted mid-run and recomputed; its prompt logprobs come once, unchanged
    small = LLM(tiny_dir, kvcache_block_size=8, max_num_batched_tokens=64, num_kv_blocks=24)
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=k)]
    seqs = []  # the victim is the sequence admitted last: the one with prompt logprobs
    preempt = small.engine.core.scheduler._preempt
    small.engine.core.scheduler._preempt = lambda seq: (seqs.append(seq.request_id), preempt(seq))
    outs = small.generate([random_prompts(1, 60, 60, seed=2)[0], prompt[:60]], params, use_tqdm=False)
    assert outs[1].request_id in seqs
    again = outs[1].prompt_logprobs
    assert len(again) == 60
    for mine, theirs in zip(again[1:], got[1:60], strict=True):
        assert mine.keys() == theirs.keys()
        assert [mine[t].logprob for t in theirs] == pytest.approx([lp.logprob for lp in theirs.values()], abs=1e-4)
