"""Async scheduling (the core launches step N + 1 before resolving step N) against the synchronous loop.

Two engines on the same fp32 tiny model, one per loop, must give token-identical outputs (greedy and seeded),
whatever ends a request: max_tokens (1 included), EOS, stop token ids, stop strings, aborts, preemption, prefix
cache hits, n > 1, prompt logprobs, penalties (counted on the device). Every core is watched: no output
after its request finished, never a placeholder token, and every KV block back at the end."""

from __future__ import annotations

import pytest
from conftest import random_prompts, watch_core_outputs, watched_llm

from splitserve import LLM, SamplingParams
from splitserve.engine.sequence import PLACEHOLDER

EOS = 2  # the tiny model's eos_token_id


def _watch(llm: LLM) -> dict:
    """Check every core step's outputs; count launches that read a placeholder input from the device."""
    core, runner = llm.engine.core, llm.engine.core.runner
    seen = {"device_inputs": 0, "penalty_placeholders": 0}
    watch_core_outputs(core, seen)
    launch, penalties = runner.launch, runner._penalty_tensors

    def counting_launch(batch, prev=None, *args, **kw):
        seen["device_inputs"] += any(s.token_ids[s.num_computed_tokens] == PLACEHOLDER for s in batch.seqs)
        return launch(batch, prev, *args, **kw)

    def checked_penalties(seqs, prev=None):  # async penalties: the last token may be on the device only
        seen["penalty_placeholders"] += any(s.token_ids[-1] == PLACEHOLDER for s in seqs
                                            if s.sampling_params.has_penalties)
        return penalties(seqs, prev)

    runner.launch, runner._penalty_tensors = counting_launch, checked_penalties
    return seen


def _make(tiny_dir: str, async_scheduling: bool, **kw) -> LLM:
    return watched_llm(tiny_dir, _watch, async_scheduling=async_scheduling, **{"max_num_batched_tokens": 64, **kw})


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_model):
    return make_tiny_model("qwen3", seed=5)


@pytest.fixture(scope="module")
def pair(tiny_dir):
    return _make(tiny_dir, True), _make(tiny_dir, False)


def _summary(outputs) -> list:
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason,
              None if c.logprobs is None else [{t: round(lp.logprob, 4) for t, lp in e.items()} for e in c.logprobs])
             for c in o.outputs] for o in outputs]


def _same(pair, prompts, params) -> list:
    """Both loops' outputs (checked equal); returns the async engine's."""
    outs = [llm.generate(prompts, params, use_tqdm=False) for llm in pair]
    assert _summary(outs[0]) == _summary(outs[1])
    for llm in pair:
        assert llm.stats()["kv_used_blocks"] == 0
        assert not llm.engine.has_unfinished_requests() and llm.engine.core.pending is None is llm.engine.core.unsampled
    return outs[0]


def test_config_and_stats(pair):
    assert [llm.stats()["async_scheduling"] for llm in pair] == [True, False]
    with pytest.raises(ValueError, match="async_scheduling"):
        LLM(None, async_scheduling="yes")


def test_greedy_seeded_logprobs_and_max_tokens_1(pair):
    prompts = random_prompts(6, 3, 90, seed=1)  # some longer than the 64-token budget: chunked prefill
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=1.0, seed=3, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=4, max_tokens=1, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=5, max_tokens=17, ignore_eos=True, logprobs=0),
              SamplingParams(temperature=0.5, min_p=0.1, seed=6, max_tokens=9, ignore_eos=True)]
    outs = _same(pair, prompts, params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    assert pair[0].watch["device_inputs"] > 0  # the async loop really fed tokens from the device


def test_eos_and_stop_token_ids_run_one_step_more_and_drop_it(pair):
    # A bias makes EOS likely so seeded requests end at different steps; min_tokens holds it off.
    prompts = random_prompts(8, 4, 30, seed=2)
    params = [SamplingParams(temperature=1.0, seed=10 + i, max_tokens=40, logit_bias={EOS: 8.0},
                             min_tokens=3 if i % 2 else 0) for i in range(8)]
    outs = _same(pair, prompts, params)
    ends = [o.outputs[0] for o in outs]
    assert sum(c.finish_reason == "stop" for c in ends) >= 4 and any(c.finish_reason == "length" for c in ends)
    for c, p in zip(ends, params):
        if c.finish_reason == "stop":  # EOS is the last token and the only one (not past it)
            assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1] and len(c.token_ids) > p.min_tokens
    # stop token ids: a token each greedy run emits mid-way
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    free = pair[1].generate(prompts, greedy, use_tqdm=False)
    stops = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                            stop_token_ids=[o.outputs[0].token_ids[5 + i % 7]]) for i, o in enumerate(free)]
    outs = _same(pair, prompts, stops)
    for o, f, p in zip(outs, free, stops):
        c, stop = o.outputs[0], p.stop_token_ids[0]
        assert c.finish_reason == "stop" and c.stop_reason == stop
        assert c.token_ids == f.outputs[0].token_ids[:f.outputs[0].token_ids.index(stop) + 1]


def test_stop_strings(pair):
    prompts = random_prompts(5, 5, 40, seed=3)
    free = pair[1].generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    params = []
    for i, o in enumerate(free):
        text = o.outputs[0].text
        stop = text[len(text) // 3:len(text) // 3 + 3] or "x"
        params.append(SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop],
                                     include_stop_str_in_output=bool(i % 2)))
    outs = _same(pair, prompts, params)
    for o, f in zip(outs, free):
        c = o.outputs[0]
        assert c.finish_reason == "stop" and isinstance(c.stop_reason, str)
        assert len(c.token_ids) < len(f.outputs[0].token_ids)  # stopped early: not one token past the stop
        assert c.token_ids == f.outputs[0].token_ids[:len(c.token_ids)]


def _run_with_abort(llm: LLM, prompts, params, victim: int, after: int):
    engine = llm.engine
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished_requests():
        engine.step()
        if reqs[victim].num_output_tokens >= after and not reqs[victim].is_finished:
            assert engine.abort(reqs[victim].request_id)
    for r in reqs:
        engine.release(r)
    return [(r.output_token_ids, r.finish_reason) for r in reqs]


def test_abort_mid_run(pair):
    prompts = random_prompts(4, 5, 20, seed=4)
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=16, ignore_eos=True)
    got = [_run_with_abort(llm, prompts, params, victim=1, after=5) for llm in pair]
    assert got[0] == got[1]
    assert got[0][1][1] == "abort" and len(got[0][1][0]) == 5
    for llm in pair:
        assert llm.stats()["kv_used_blocks"] == 0 and llm.engine.core.pending is None is llm.engine.core.unsampled


def test_preemption(tiny_dir):
    # 14 blocks of 8 tokens for 4 sequences growing to ~50 tokens: preempted and recomputed
    pair = [_make(tiny_dir, a, num_kv_blocks=14, max_num_batched_tokens=32) for a in (True, False)]
    prompts = random_prompts(4, 10, 24, seed=5)
    params = [SamplingParams(temperature=1.0, seed=20 + i, max_tokens=28, ignore_eos=True) for i in range(4)]
    _same(pair, prompts, params)
    assert all(llm.stats()["num_preemptions"] > 0 for llm in pair)


def test_prefix_cache_hits_on_generated_tokens(pair):
    """The second wave's prompts are the first wave's prompts plus their outputs: the cache must hold the
    generated tokens' blocks, hashed after they resolved (never a placeholder)."""
    prompts = random_prompts(3, 17, 30, seed=6)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    first = _same(pair, prompts, params)
    follow = [p + o.outputs[0].token_ids for p, o in zip(prompts, first)]
    hits = [llm.stats()["prefix_cache_hit_tokens"] for llm in pair]
    _same(pair, follow, params)
    gained = [llm.stats()["prefix_cache_hit_tokens"] - h for llm, h in zip(pair, hits)]
    assert gained[0] == gained[1] > sum(len(p) for p in prompts)  # hits reach into the generated tokens
    for llm in pair:
        assert all(t >= 0 for b in llm.engine.core.block_manager.blocks for t in b.token_ids)


def test_n_and_prompt_logprobs(pair):
    prompts = random_prompts(2, 20, 70, seed=7)
    params = [SamplingParams(n=3, temperature=1.0, seed=40, max_tokens=10, ignore_eos=True, prompt_logprobs=2),
              SamplingParams(n=2, temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)]
    outs = [llm.generate(prompts, params, use_tqdm=False) for llm in pair]
    assert _summary(outs[0]) == _summary(outs[1])
    first = [[{t: round(lp.logprob, 4) for t, lp in e.items()} if e else e for e in o.prompt_logprobs]
             for o in (outs[0][0], outs[1][0])]
    assert first[0] == first[1] and len(first[0]) == len(prompts[0])
    for llm in pair:
        assert llm.stats()["kv_used_blocks"] == 0


def test_penalties_stay_async_and_equal_the_synchronous_loop(pair):
    """Penalised rows keep the overlap: their counts take a token still on the device from the previous
    step's tensor (worker/penalties.py); outputs equal the synchronous loop's, greedy and seeded."""
    prompts = random_prompts(4, 5, 30, seed=8)
    params = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=1.0, seed=2, max_tokens=14, ignore_eos=True, frequency_penalty=1.5),
              SamplingParams(temperature=1.0, seed=3, max_tokens=14, ignore_eos=True, presence_penalty=-1.0),
              SamplingParams(temperature=1.0, seed=4, max_tokens=14, ignore_eos=True, logit_bias={7: 3.0},
                             min_tokens=4)]
    before = pair[0].watch["penalty_placeholders"]
    _same(pair, prompts, params)
    assert pair[0].watch["penalty_placeholders"] > before  # the device path really ran (async)
    assert pair[1].watch["penalty_placeholders"] == 0  # the synchronous loop never has a placeholder


def test_no_request_left_behind(pair):
    """Every test above ran through the watched cores; their checks raised inside generate if they failed."""
    for llm in pair:
        assert llm.watch["finished"] and not llm.engine.requests and not llm.engine.core.requests
