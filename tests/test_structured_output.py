"""Structured outputs (xgrammar): JSON schema, regex, choice, json_object, grammars; offline, over HTTP
(streamed and not), under preemption and in two-process PD.

The tiny model has random weights, so only the grammar makes its output valid. Its vocabulary is SmolLM2's
first 10,240 tokens (the tokenizer is SmolLM2's): sampling cost grows with the vocabulary, and seeded sampling
of 100 rows over 49k tokens takes most of a minute on two cores. Prompts are token ids in that range, and chat
requests bring a system message (the default one has tokens beyond it).
"""

import concurrent.futures
import json
import logging
import re
import sys
import threading
import time

import pytest

from splitserve import LLM, SamplingParams, StructuredOutputsParams
from splitserve.engine import structured_output
from splitserve.engine.structured_output import StructuredOutputManager

VOCAB = 10240  # holds the chat template's tokens when the request brings its own system message
PROMPT = [5, 6, 7, 8, 9]
SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "string", "maxLength": 4},
        "k": {"type": "integer", "minimum": -5, "maximum": 99},
        "e": {"enum": ["red", "green", 7]},
        "t": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2},
        "o": {"type": "object", "properties": {"x": {"type": "boolean"}, "y": {"type": "string", "enum": ["u", "v"]}},
              "required": ["x", "y"], "additionalProperties": False},
    },
    "required": ["n", "k", "e", "t", "o"],
    "additionalProperties": False,
}
CHAT = [{"role": "system", "content": "a"}, {"role": "user", "content": "hi"}]
MAX_TOKENS = 120  # the schema's longest output is well below this, even one byte per token


def validate(value, schema: dict, path: str = "$") -> None:
    """The JSON-schema features SCHEMA uses (jsonschema is not a dependency)."""
    if "enum" in schema:
        assert any(value == e and type(value) is type(e) for e in schema["enum"]), f"{path}: {value!r} not in enum"
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), f"{path}: not an object"
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{path}: {key} missing"
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{path}: extra keys {set(value) - set(props)}"
        for key, sub in props.items():
            if key in value:
                validate(value[key], sub, f"{path}.{key}")
    elif kind == "array":
        assert isinstance(value, list) and len(value) <= schema.get("maxItems", len(value)), f"{path}: bad array"
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{i}]")
    elif kind == "integer":
        assert type(value) is int and schema.get("minimum", value) <= value <= schema.get("maximum", value), path
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", len(value)), f"{path}: {value!r}"
    elif kind == "boolean":
        assert isinstance(value, bool), path


def check_json(text: str) -> None:
    validate(json.loads(text), SCHEMA)


def json_params(seed: int | None, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=MAX_TOKENS,
                          structured_outputs=StructuredOutputsParams(json=SCHEMA), **kw)


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_model):
    return make_tiny_model("qwen3", seed=11, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(tiny_dir, device="cpu")


def test_json_schema_100_seeded_samples_parse_and_validate(llm):
    outs = llm.generate([PROMPT] * 100, [json_params(seed) for seed in range(100)], use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", (c.finish_reason, c.text)
        check_json(c.text)
    assert len({o.outputs[0].text for o in outs}) > 50  # sampled, not one answer repeated


def test_regex_choice_json_object_grammar_and_plain_rows_in_one_batch(llm):
    regex = r"[a-z]{2,5}-[0-9]{2}"
    choices = ["yes", "no", "maybe so", "ünïcode \"quoted\""]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain_prompts = [[11, 12, 13], [40, 41, 42, 43]]
    alone = [o.outputs[0].token_ids for o in llm.generate(plain_prompts, greedy, use_tqdm=False)]
    structured = (
        [SamplingParams(temperature=1, seed=i, max_tokens=16, structured_outputs=StructuredOutputsParams(regex=regex))
         for i in range(8)]
        + [SamplingParams(temperature=1, seed=i, max_tokens=16,
                          structured_outputs=StructuredOutputsParams(choice=choices)) for i in range(8)]
        + [SamplingParams(temperature=0.7, seed=i, max_tokens=MAX_TOKENS,
                          structured_outputs=StructuredOutputsParams(json_object=True)) for i in range(4)]
        + [SamplingParams(temperature=1, seed=i, max_tokens=16, structured_outputs=StructuredOutputsParams(
            grammar='root ::= "(" [0-9]{1,3} ("+" [0-9]{1,3})? ")"')) for i in range(4)])
    outs = llm.generate([PROMPT] * len(structured) + plain_prompts, structured + [greedy, greedy], use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert all(re.fullmatch(regex, t) for t in texts[:8]), texts[:8]
    assert all(t in choices for t in texts[8:16]), texts[8:16]
    for t, o in zip(texts[16:20], outs[16:20]):
        if o.outputs[0].finish_reason == "stop":  # an open-ended object may run out of tokens: "length"
            assert isinstance(json.loads(t), dict)
    assert any(o.outputs[0].finish_reason == "stop" for o in outs[16:20])
    assert all(re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})?\)", t) for t in texts[20:24]), texts[20:24]
    assert [o.outputs[0].token_ids for o in outs[24:]] == alone  # plain rows: as when run alone


def _mixed_requests() -> tuple[list, list[SamplingParams]]:
    regex = r"[a-z]{2,5}-[0-9]{2}"
    params = ([json_params(seed, logprobs=2) for seed in range(6)]
              + [SamplingParams(temperature=1, seed=i, max_tokens=16,
                                structured_outputs=StructuredOutputsParams(regex=regex)) for i in range(4)]
              + [json_params(7, repetition_penalty=1.3, presence_penalty=0.5)]
              + [SamplingParams(temperature=1, seed=9, max_tokens=20, stop=["e"]),
                 SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                 # penalties and min_tokens in a batch whose sampling is deferred: EOS (id 2) made likely
                 SamplingParams(temperature=1, seed=12, max_tokens=16, frequency_penalty=0.8, min_tokens=10,
                                logit_bias={2: 15.0})])
    return [PROMPT] * 11 + [[11, 12, 13], [40, 41, 42, 43], [50, 51, 52]], params


def test_async_structured_steps_equal_the_synchronous_loop_and_sample_before_the_next_launch(tiny_dir, llm,
                                                                                           monkeypatch):
    """A structured step's forward launches alone; its masks start filling in threads before the core step
    returns (the front end runs meanwhile), and the next core step enqueues its sampling first, then launches
    the following forward, before any output goes back to the front end (the device runs that forward while
    the host resolves and detokenizes). Outputs equal the synchronous loop's: seeded JSON with logprobs, regex,
    stop strings and plain rows in one batch."""
    prompts, params = _mixed_requests()
    sync = LLM(tiny_dir, device="cpu", async_scheduling=False)
    want = sync.generate(prompts, params, use_tqdm=False)
    core, runner = llm.engine.core, llm.engine.core.runner
    events, launch, sample, step = [], runner.launch, runner.sample, core.step

    def spy_launch(batch, prev=None, defer_sampling=False, host=None):
        events.append("forward" if defer_sampling else "launch")
        return launch(batch, prev, defer_sampling, host)

    def spy_sample(launched, grammar=None):
        events.append("sample" if grammar is not None else "sample-unmasked")
        return sample(launched, grammar)

    def spy_step():
        events.append("|")
        return step()

    start_fill = StructuredOutputManager.start_fill

    def spy_fill(manager, grammars):
        events.append("fill")
        return start_fill(manager, grammars)

    monkeypatch.setattr(StructuredOutputManager, "start_fill", spy_fill)
    runner.launch, runner.sample, core.step = spy_launch, spy_sample, spy_step
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
    finally:
        del runner.launch, runner.sample, core.step
    def summary(outs):  # logprobs to 4 places: an extra row (a step past a stop) rounds the CPU GEMM otherwise
        return [[(c.token_ids, c.text, c.finish_reason, None if c.logprobs is None else
                  [{t: (round(lp.logprob, 4), lp.rank) for t, lp in e.items()} for e in c.logprobs])
                 for c in o.outputs] for o in outs]

    assert summary(got) == summary(want)
    assert all(re.fullmatch(r"[a-z]{2,5}-[0-9]{2}", o.outputs[0].text) for o in got[6:10])
    check_json(got[10].outputs[0].text)
    eos_row = got[-1].outputs[0]  # min_tokens holds EOS back for 10 tokens, then the bias ends it soon
    assert 10 <= len(eos_row.token_ids) < 16 and eos_row.finish_reason == "stop", eos_row.token_ids
    calls = [c.split() for c in " ".join(events).split("|")]
    steady = [c for c in calls if c == ["sample", "forward", "fill"]]  # masked sampling, the next forward, its fill
    assert len(steady) >= 10, calls
    assert not any("sample" in c and "forward" in c and c.index("forward") < c.index("sample") for c in calls), \
        calls  # never a forward launched before the sampling that its inputs follow, within one step
    assert core.pending is None is core.unsampled and llm.stats()["kv_used_blocks"] == 0


def test_shutdown_with_a_mask_fill_in_flight_restores_the_switch_interval(tiny_dir):
    before = sys.getswitchinterval()
    llm = LLM(tiny_dir, device="cpu")
    core = llm.engine.core
    llm.engine.add_request(PROMPT, json_params(0))
    while core.mask_fill is None and llm.engine.has_unfinished_requests():  # compile, prefill, structured steps
        llm.engine.step()
    assert core.mask_fill is not None  # a structured step left its masks filling while the request ran
    assert sys.getswitchinterval() < before
    core.shutdown()
    assert sys.getswitchinterval() == pytest.approx(before, abs=1e-6)


def test_abort_between_a_structured_forward_and_its_sampling(llm):
    """An aborted request's row in a forward whose sampling is still deferred: its token is dropped, its matcher
    is gone (the row samples unmasked), the others go on, and every block comes back."""
    engine = llm.engine
    reqs = [engine.add_request(PROMPT, json_params(seed)) for seed in range(3)]
    for _ in range(10_000):  # the grammars compile in a thread first
        if engine.core.unsampled is not None and any(s.num_output_tokens for s in engine.core.unsampled.samplers):
            break
        engine.step()
    victim = engine.core.unsampled.samplers[0].request_id
    engine.abort(victim)
    while engine.has_unfinished_requests():
        engine.step()
    for r in reqs:
        if r.request_id == victim:
            assert r.finish_reason == "abort"
        else:
            assert r.finish_reason == "stop", r.output_text
            check_json(r.output_text)
        engine.release(r)
    assert engine.core.pending is None is engine.core.unsampled and llm.stats()["kv_used_blocks"] == 0


def test_a_token_its_grammar_rejects_ends_that_request_only(llm, monkeypatch, caplog):
    """With the mask patched out, sampled tokens break the grammar: each such request ends with "abort" and an
    ERROR naming it, a plain request beside them is untouched, and every block comes back."""
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate([PROMPT], plain, use_tqdm=False)[0].outputs[0].token_ids
    monkeypatch.setattr(structured_output, "apply_bitmask", lambda *args: None)
    with caplog.at_level(logging.ERROR, logger="splitserve"):
        outs = llm.generate([PROMPT] * 5, [json_params(seed) for seed in range(4)] + [plain], use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["abort"] * 4 + ["length"]
    assert outs[4].outputs[0].token_ids == alone
    errors = [r.getMessage().split(":")[0] for r in caplog.records if "its grammar rejected" in r.getMessage()]
    assert sorted(errors) == sorted(f"request {o.request_id}" for o in outs[:4])
    assert llm.stats()["kv_used_blocks"] == 0


def test_too_few_tokens_end_with_length_and_logprobs_stay_raw(llm):
    out = llm.generate([PROMPT], json_params(0, logprobs=2), use_tqdm=False)[0].outputs[0]
    short = llm.generate([PROMPT], SamplingParams(max_tokens=3, seed=0, structured_outputs=StructuredOutputsParams(
        json=SCHEMA)), use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 3 and short.text.startswith("{")
    # logprobs are the model's raw ones: the forced tokens of the grammar are not all at probability 1
    assert out.finish_reason == "stop" and min(lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)) < -1.0


@pytest.mark.parametrize("kw, message", [
    ({"json": {"type": "foo"}}, "invalid json schema: Unsupported type"),
    ({"json": {"type": "integer", "minimum": 5, "maximum": 1}}, "invalid json schema"),
    ({"json": "{not json"}, "json schema is not valid JSON"),
    ({"regex": "(ab"}, "invalid regex"),
    ({"grammar": "root ::= undefined_rule"}, "invalid grammar"),
    ({"json": json.loads('{"type": "array", "items": ' * 40 + "{}" + "}" * 40)}, "nested deeper than 32"),
    ({"regex": "a" * 70000}, "at most 65536 characters"),
    ({"choice": []}, "choice must be a list of 1 to"),
])
def test_bad_specs_are_value_errors_naming_the_problem(llm, kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.engine.make_request(PROMPT, SamplingParams(structured_outputs=StructuredOutputsParams(**kw)))


def test_exactly_one_kind_and_a_good_request_beside_bad_ones_is_unaffected(llm):
    for kw in ({}, {"regex": "a", "choice": ["b"]}, {"json": SCHEMA, "json_object": True}):
        with pytest.raises(ValueError, match="exactly one of json, regex, choice, grammar, json_object"):
            StructuredOutputsParams(**kw)
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": SCHEMA})
    with pytest.raises(ValueError, match="invalid regex"):
        llm.generate([PROMPT, PROMPT], [json_params(1), SamplingParams(
            structured_outputs=StructuredOutputsParams(regex="[z-a]"))], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    check_json(llm.generate([PROMPT], json_params(1), use_tqdm=False)[0].outputs[0].text)


def test_preemption_keeps_the_matchers_right(tiny_dir):
    small = LLM(tiny_dir, device="cpu", num_kv_blocks=40, kvcache_block_size=8)
    outs = small.generate([PROMPT] * 12, [json_params(100 + i) for i in range(12)], use_tqdm=False)
    assert small.stats()["num_preemptions"] > 0
    for o in outs:
        assert o.outputs[0].finish_reason == "stop"
        check_json(o.outputs[0].text)


def test_threaded_mask_fill_equals_xgrammar_row_by_row(tiny_dir):
    """The manager's fill in xgrammar's threads (3 here; rows without a grammar between them) against
    xgrammar's own one-matcher fill of each row, with the matchers spread over different states."""
    import random

    import torch
    import xgrammar as xgr

    manager = StructuredOutputManager(tiny_dir, VOCAB, frozenset([2]), torch.device("cpu"), fill_threads=3)
    try:
        kinds = [StructuredOutputsParams(json=SCHEMA), StructuredOutputsParams(regex=r"[a-z]{2,9}-[0-9]{2}"),
                 StructuredOutputsParams(choice=["alpha", "beta", "gamma delta"]),
                 StructuredOutputsParams(json_object=True)]
        grammars = [None if i % 4 == 3 else manager.submit(kinds[i % len(kinds)]) for i in range(23)]
        rng = random.Random(0)
        one = xgr.allocate_token_bitmask(1, VOCAB)
        for step, g in enumerate(grammars):
            if g is None:
                continue
            g.future.result()
            assert manager.make_ready(g, [])
            for _ in range(step % 7):  # walk each row a different number of allowed tokens, never the EOS
                g.matcher.fill_next_token_bitmask(one, 0)
                allowed = [t for t in range(VOCAB) if one[0, t // 32] >> (t % 32) & 1 and t != 2]
                if not allowed:
                    break
                assert g.matcher.accept_token(rng.choice(allowed))
        before = sys.getswitchinterval()
        fill = manager.start_fill(grammars)  # the engine thread's Python must not hold the fill thread back
        # (CPython keeps the interval in whole microseconds)
        assert sys.getswitchinterval() == pytest.approx(min(structured_output.FILL_SWITCH_INTERVAL_S, before), abs=1e-6)
        bitmask, rows = fill.result()
        assert sys.getswitchinterval() == pytest.approx(before, abs=1e-6)  # and only while a fill is in flight
        assert rows == [i for i, g in enumerate(grammars) if g is not None]
        for i in rows:
            grammars[i].matcher.fill_next_token_bitmask(one, 0)
            assert torch.equal(bitmask[i], one[0]), f"row {i}"
    finally:
        manager.shutdown()


def test_the_compile_time_limit_counts_from_its_start_not_from_the_queue(tiny_dir, monkeypatch):
    """Compiles slower than the limit, one per compile thread, and a fast one queued behind them for longer than
    the limit: the slow ones fail with the time-limit error, the fast one compiles (its wait in the queue is not
    its compile time)."""
    import torch

    monkeypatch.setattr(structured_output, "COMPILE_TIMEOUT_S", 2.0)
    manager = StructuredOutputManager(tiny_dir, VOCAB, frozenset([2]), torch.device("cpu"))
    try:
        manager.compiler()  # built now: the fast compile below is only its own work
        real = manager._compile

        def compile_(kind, text):
            if text == "slow":  # well past the limit: a loaded box's slow polling still sees it time out
                time.sleep(6.0)
                text = "a"
            return real(kind, text)

        monkeypatch.setattr(manager, "_compile", compile_)
        slow = [manager.submit(StructuredOutputsParams(regex="slow")) for _ in range(structured_output.COMPILE_THREADS)]
        fast = manager.submit(StructuredOutputsParams(regex="[0-9]+"))
        results: dict[int, str] = {}
        deadline = time.monotonic() + 30
        while len(results) < len(slow) + 1 and time.monotonic() < deadline:
            for i, g in enumerate(slow + [fast]):
                if i in results:
                    continue
                try:
                    if manager.make_ready(g, []):
                        results[i] = "ready"
                except ValueError as e:
                    results[i] = str(e)
            time.sleep(0.05)
        assert results[len(slow)] == "ready", results
        assert all("took longer than 2 s to compile" in results[i] for i in range(len(slow))), results
    finally:
        manager.shutdown()


def test_a_grammar_the_core_cannot_compile_ends_its_request_with_the_reason(tiny_dir, monkeypatch, caplog):
    """A grammar whose compile fails in the core (after the front end's check passed): the request ends with no
    tokens and its reason, offline and through AsyncLLM; the server answers that with a 400, not an empty 200."""
    import asyncio

    from splitserve.server.api import _merge
    from splitserve.server.async_engine import AsyncLLM, RequestRefusedError
    from splitserve.server.protocol import APIError

    def fail(self, kind, text):
        raise RuntimeError("no room for it")

    monkeypatch.setattr(StructuredOutputManager, "_compile", fail)
    llm = LLM(tiny_dir, device="cpu")
    engine = llm.engine
    params = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(regex="[0-9]+"))
    request = engine.add_request(PROMPT, params)
    while engine.has_unfinished_requests():
        engine.step()
    assert request.finish_reason == "abort" and request.output_token_ids == []
    assert request.error == "the grammar failed to compile: no room for it"
    # offline: the output carries the reason, the other request is served, and one WARNING says so
    with caplog.at_level("WARNING", logger="splitserve"):
        outs = llm.generate([PROMPT, PROMPT], [params, SamplingParams(max_tokens=4, ignore_eos=True)],
                            use_tqdm=False)
    refused, served = outs[0].outputs[0], outs[1].outputs[0]
    assert (refused.finish_reason, refused.text, refused.error) == ("abort", "", request.error)
    assert served.error is None and len(served.token_ids) == 4 and served.finish_reason == "length"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "refused" in r.getMessage()] == [
        f"1 of 2 requests were refused by the engine (finish_reason 'abort', no text); the first: {request.error}"]

    async def through_the_server():
        llm = AsyncLLM(engine)
        llm.start()
        try:
            with pytest.raises(APIError) as refused:
                async for _ in _merge([llm.generate(llm.make_requests(PROMPT, params)[0])]):
                    pass
        finally:
            llm.shutdown()
        return refused.value

    refused = asyncio.run(through_the_server())
    assert refused.status == 400 and "failed to compile: no room for it" in refused.message
    assert issubclass(RequestRefusedError, ValueError)


def test_fill_threads_follow_the_usable_cpus(monkeypatch):
    import os

    for cpus, threads in ((1, 1), (2, 2), (6, 6), (16, 8), (192, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert structured_output.default_fill_threads() == threads


def test_a_mixed_batch_samples_the_same_tokens_with_one_or_four_fill_threads(tiny_dir, monkeypatch):
    """Seeded rows of two grammar kinds and plain rows, their masks filled by one thread and by four: the masks
    are the same, so the tokens are too."""
    params = ([json_params(300 + i) for i in range(6)]
              + [SamplingParams(temperature=1, seed=i, max_tokens=16,
                                structured_outputs=StructuredOutputsParams(regex=r"[a-z]{2,5}-[0-9]{2}"))
                 for i in range(5)]
              + [SamplingParams(temperature=1, seed=i, max_tokens=16, ignore_eos=True) for i in range(5)])
    tokens = {}
    for threads in (1, 4):
        monkeypatch.setattr(structured_output, "default_fill_threads", lambda n=threads: n)
        engine = LLM(tiny_dir, device="cpu")
        outs = engine.generate([PROMPT] * len(params), params, use_tqdm=False)
        assert engine.engine.core.structured.fill_threads == threads
        tokens[threads] = [o.outputs[0].token_ids for o in outs]
        for o in outs[:6]:
            check_json(o.outputs[0].text)
        engine.shutdown()
    assert tokens[1] == tokens[4]


@pytest.mark.slow
def test_pd_workers_rebuild_the_matcher_and_match_colocated(tiny_dir, llm):
    greedy = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured_outputs=StructuredOutputsParams(
        json=SCHEMA)), SamplingParams(temperature=0, max_tokens=16, structured_outputs=StructuredOutputsParams(
            choice=["alpha", "beta"]))]
    sampled = [json_params(200 + i) for i in range(6)]
    prompts = [PROMPT, [20, 21, 22]] + [PROMPT] * 6
    colocated = [o.outputs[0].text for o in llm.generate(prompts, greedy + sampled, use_tqdm=False)]
    pd = LLM(tiny_dir, device="cpu", enable_two_gpu_pd=True)
    try:
        texts = [o.outputs[0].text for o in pd.generate(prompts, greedy + sampled, use_tqdm=False)]
    finally:
        pd.engine.shutdown()
    assert texts == colocated
    for t in [texts[0]] + texts[2:]:
        check_json(t)


# ---- HTTP ----
@pytest.fixture(scope="module")
def server(tiny_dir):
    from test_server import running_server

    with running_server(tiny_dir) as url:
        yield url


def _stream(url: str, body: dict) -> tuple[str, str | None]:
    """POST with stream=true; returns (the text of the deltas joined, the last finish_reason)."""
    import urllib.request

    from test_server import API_KEY, sse_chunks

    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    text, finish = [], None
    with urllib.request.urlopen(req, timeout=120) as resp:
        for chunk in sse_chunks(resp):
            for choice in chunk["choices"]:
                text.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
                finish = choice["finish_reason"] or finish
    return "".join(text), finish


def test_server_100_streamed_samples_parse_and_validate(server):
    chat = {"messages": CHAT, "max_tokens": MAX_TOKENS,
            "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA, "strict": True}}}
    completion = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "guided_json": SCHEMA}
    jobs = [(server + "/v1/chat/completions", {**chat, "seed": i}) if i % 2 else
            (server + "/v1/completions", {**completion, "seed": i}) for i in range(100)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda job: _stream(*job), jobs))
    for text, finish in results:
        assert finish == "stop", (finish, text)
        check_json(text)


def test_server_fields_on_both_endpoints(server):
    from test_server import http

    def complete(**fields) -> dict:
        status, body = http("POST", server + "/v1/completions", {"prompt": PROMPT, "max_tokens": 16, **fields})
        assert status == 200, body
        return body["choices"][0]

    def chat(**fields) -> dict:
        status, body = http("POST", server + "/v1/chat/completions",
                            {"messages": CHAT, "max_tokens": 16, **fields})
        assert status == 200, body
        return body["choices"][0]

    assert re.fullmatch(r"[0-9]{3}", complete(guided_regex="[0-9]{3}", seed=1)["text"])
    assert complete(guided_choice=["on", "off"], seed=2)["text"] in ("on", "off")
    assert chat(guided_choice=["on", "off"], seed=3)["message"]["content"] in ("on", "off")
    assert re.fullmatch(r"x+", chat(structured_outputs={"regex": "x+"}, max_tokens=4)["message"]["content"])
    assert complete(structured_outputs={"choice": ["a1", "b2"]})["text"] in ("a1", "b2")
    assert complete(guided_grammar='root ::= "yes" | "no"', temperature=0)["text"] in ("yes", "no")
    got = complete(response_format={"type": "json_object"}, max_tokens=MAX_TOKENS, temperature=0.5, seed=4)
    if got["finish_reason"] == "stop":
        assert isinstance(json.loads(got["text"]), dict)
    assert chat(response_format={"type": "text"}, max_tokens=2)["finish_reason"] == "length"


@pytest.mark.parametrize("fields, param, message", [
    ({"guided_json": {"type": "foo"}}, "guided_json", "invalid json schema"),
    ({"guided_regex": "(ab"}, "guided_regex", "invalid regex"),
    ({"guided_grammar": "root ::= "}, "guided_grammar", "invalid grammar"),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs", "invalid regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", "invalid json schema"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "at most one structured-output constraint"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema.schema"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one of"),
    ({"guided_json": json.loads('{"type": "array", "items": ' * 40 + "{}" + "}" * 40)}, "guided_json",
     "nested deeper than 32"),
    ({"guided_choice": ["x"] * 2000}, "guided_choice", "at most 1024"),
])
def test_server_bad_inputs_are_400_naming_the_problem(server, fields, param, message):
    from test_server import http

    for endpoint, base in (("completions", {"prompt": PROMPT}),
                           ("chat/completions", {"messages": CHAT})):
        t0 = time.monotonic()
        status, body = http("POST", f"{server}/v1/{endpoint}", {**base, "max_tokens": 4, **fields})
        assert status == 400 and message in body["error"]["message"], (endpoint, body)
        assert body["error"]["param"] == param, body
        assert time.monotonic() - t0 < 10


def test_server_pathological_regex_compiles_off_the_loop_without_blocking_others(server):
    """A regex xgrammar takes ~0.7 s to compile runs in the core's grammar threads: a plain request sent after
    it is answered meanwhile, and the slow one still completes."""
    from test_server import http

    slow: dict = {}
    thread = threading.Thread(target=lambda: slow.update(result=http(
        "POST", server + "/v1/completions",
        {"prompt": PROMPT, "max_tokens": 8, "guided_regex": "(a|b|ab){50}[a-z]{1,3000}"})))
    t0 = time.monotonic()
    thread.start()
    status, body = http("POST", server + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert status == 200, body
    thread.join(60)
    assert slow["result"][0] == 200, slow
    assert re.fullmatch("[ab]*", slow["result"][1]["choices"][0]["text"])
    assert time.monotonic() - t0 < 60
