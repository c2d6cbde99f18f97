"""Scheduling behaviour: batch invariance, prefix caching, chunked prefill, preemption, abort."""

from conftest import random_prompts

from splitserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_batch_invariance_32_mixed_lengths(make_tiny_model):
    path = make_tiny_model("qwen3")
    llm = LLM(path, kvcache_block_size=8)
    prompts = random_prompts(32, 1, 120, seed=3)
    batched = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    for i in (0, 7, 19, 31):
        assert tokens(llm.generate([prompts[i]], GREEDY, use_tqdm=False))[0] == batched[i]


def test_prefix_cache_hits_and_same_outputs(make_tiny_model):
    path = make_tiny_model("llama")
    shared = random_prompts(1, 64, 64, seed=5)[0]
    suffixes = random_prompts(6, 3, 20, seed=6)
    prompts = [shared + s for s in suffixes]
    uncached = tokens(LLM(path, kvcache_block_size=8, enable_prefix_caching=False)
                      .generate(prompts, GREEDY, use_tqdm=False))
    llm = LLM(path, kvcache_block_size=8)
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    rest = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert tokens(first + rest) == uncached
    stats = llm.stats()
    assert all(o.num_cached_tokens == 64 for o in rest)  # 8 full blocks of the shared prefix
    assert stats["prefix_cache_hit_tokens"] >= 64 * len(rest)


def test_full_prompt_cache_hit_still_computes_last_token(make_tiny_model):
    path = make_tiny_model("qwen3")
    prompt = random_prompts(1, 32, 32, seed=9)[0]  # exactly 4 full blocks
    llm = LLM(path, kvcache_block_size=8)
    a = llm.generate([prompt], GREEDY, use_tqdm=False)
    b = llm.generate([prompt], GREEDY, use_tqdm=False)
    assert b[0].num_cached_tokens == 24 and tokens(a) == tokens(b)


def test_chunked_prefill_equals_unchunked(make_tiny_model):
    path = make_tiny_model("qwen3")
    prompts = random_prompts(5, 50, 300, seed=11)
    whole = tokens(LLM(path, max_num_batched_tokens=4096).generate(prompts, GREEDY, use_tqdm=False))
    chunked_llm = LLM(path, max_num_batched_tokens=37, kvcache_block_size=8)
    assert tokens(chunked_llm.generate(prompts, GREEDY, use_tqdm=False)) == whole


def test_preemption_loses_nothing(make_tiny_model):
    path = make_tiny_model("llama")
    prompts = random_prompts(12, 5, 40, seed=13)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ample = tokens(LLM(path, kvcache_block_size=4).generate(prompts, params, use_tqdm=False))
    tight = LLM(path, kvcache_block_size=4, num_kv_blocks=24, max_model_len=96)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.stats()["num_preemptions"] > 0
    assert tokens(outs) == ample
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert tight.engine.core.block_manager.num_free_blocks == 24  # every block came back


def test_abort_frees_blocks_and_others_finish(make_tiny_model):
    path = make_tiny_model("qwen3")
    llm = LLM(path, kvcache_block_size=8)
    engine = llm.engine
    prompts = random_prompts(4, 10, 30, seed=17)
    seqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)) for p in prompts]
    for _ in range(3):
        engine.step()
    assert engine.abort(seqs[1].request_id)
    while engine.has_unfinished_requests():
        engine.step()
    assert seqs[1].finish_reason == "abort"
    assert [s.num_output_tokens for s in seqs if s is not seqs[1]] == [30, 30, 30]
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks
