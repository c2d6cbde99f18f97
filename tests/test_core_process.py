"""The engine core in a process of its own (`engine_core_process`): the same outputs as the in-process core,
the same failures seen at once, nothing left behind."""

import dataclasses
import os
import signal
import threading
import time

import pytest
from conftest import process_alive, random_prompts, seconds_to_raise_after_kill

from splitserve import LLM, SamplingParams
from splitserve.disagg.procs import WorkerDiedError
from splitserve.sampling_params import StructuredOutputsParams


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_model):
    return make_tiny_model("qwen3", seed=7)


def _requests():
    """Greedy, seeded sampling with logprobs, a stop string, n > 1, prompt logprobs, penalties and a JSON schema,
    over prompts that share a prefix, in a KV cache small enough that running sequences get preempted."""
    shared = random_prompts(1, 40, 40, seed=99)[0]
    prompts = random_prompts(6, 5, 60, seed=3)
    prompts = prompts[:3] + [shared + p[:7] for p in prompts[3:]]
    params = [SamplingParams(temperature=0, max_tokens=30 + 5 * i, ignore_eos=True) for i in range(3)]
    params += [SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=24, ignore_eos=True, logprobs=2),
               SamplingParams(n=2, temperature=1.0, seed=6, max_tokens=20, ignore_eos=True, prompt_logprobs=1,
                              presence_penalty=0.5, repetition_penalty=1.2),
               SamplingParams(temperature=0.7, seed=7, max_tokens=40, structured_outputs=StructuredOutputsParams(
                   json={"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}))]
    return prompts, params


def _texts(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.logprobs and [sorted(e) for e in c.logprobs])
             for c in o.outputs] for o in outs]


def test_core_process_gives_the_in_process_outputs(tiny_dir):
    prompts, params = _requests()
    engine_args = dict(device="cpu", num_kv_blocks=16, max_num_batched_tokens=64)  # 16 blocks: preemption
    local = LLM(tiny_dir, **engine_args)
    expected = local.generate(prompts, params, use_tqdm=False)
    assert local.stats()["num_preemptions"] > 0  # the cache is small enough whatever the arrival order
    stop = expected[0].outputs[0].text[10:13]
    expected_stop = local.generate(prompts[:1], dataclasses.replace(params[0], stop=[stop]), use_tqdm=False)
    llm = LLM(tiny_dir, engine_core_process=True, **engine_args)
    try:
        pid = llm.engine.core.worker_pids()["core"]
        assert pid != os.getpid() and process_alive(pid)
        got = llm.generate(prompts, params, use_tqdm=False)
        got_stop = llm.generate(prompts[:1], dataclasses.replace(params[0], stop=[stop]), use_tqdm=False)
        # an abort mid-run: the request ends, the others go on
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        a, b = (llm.engine.add_request(p, long) for p in prompts[:2])
        while a.num_output_tokens < 3:
            llm.engine.step()
        llm.engine.abort(a.request_id)
        while not b.is_finished:
            llm.engine.step()
        stats = llm.stats()
    finally:
        llm.shutdown()
    assert _texts(got) == _texts(expected)
    assert [o.prompt_logprobs is None for o in got] == [o.prompt_logprobs is None for o in expected]
    assert _texts(got_stop) == _texts(expected_stop) and got_stop[0].outputs[0].finish_reason == "stop"
    assert a.finish_reason == "abort" and 3 <= a.num_output_tokens < 200 and b.num_output_tokens == 200
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0, stats
    assert stats["engine_core_process"]["pid"] == pid
    # the core process froze its start-up heap (a full garbage collection would stall every request); the
    # offline in-process engine does not (a process that builds many engines must be able to free them)
    assert stats["gc_frozen_objects"] > 10_000 and local.stats()["gc_frozen_objects"] == 0
    assert stats["kv_used_blocks"] == 0 and not llm.engine.has_unfinished_requests()
    assert not process_alive(pid)  # shutdown stops it


def test_killed_core_process_raises_at_once_and_the_engine_stays_dead(tiny_dir):
    llm = LLM(tiny_dir, device="cpu", engine_core_process=True, max_model_len=2048)
    pid = llm.engine.core.worker_pids()["core"]
    prompts = random_prompts(8, 100, 300, seed=1)
    params = SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)
    delay = seconds_to_raise_after_kill(lambda: llm.generate(prompts, params, use_tqdm=False), pid, 2.0,
                                        WorkerDiedError, r"the core worker \(pid \d+\) exited with code -9")
    # a product promise: a dead core is seen at once (its process sentinel), not after a time-out
    assert delay < 2.0, delay
    assert not process_alive(pid)
    assert (llm.engine.gauges().running, llm.engine.gauges().waiting) == (0, 0)
    with pytest.raises(WorkerDiedError):
        llm.generate(prompts[:1], params, use_tqdm=False)


def test_core_process_flag_is_checked():
    with pytest.raises(ValueError, match="engine_core_process must be True or False"):
        LLM("unused", engine_core_process="yes")
    with pytest.raises(ValueError, match="engine_core_process and enable_two_gpu_pd cannot be combined"):
        LLM("unused", engine_core_process=True, enable_two_gpu_pd=True)


def test_outputs_that_arrive_while_stats_waits_are_delivered(tiny_dir):
    llm = LLM(tiny_dir, device="cpu", engine_core_process=True)
    try:
        client = llm.engine.core
        request = llm.engine.add_request([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
        while request.request_id in client.requests:  # the core finishes it while only stats() takes messages in
            llm.stats()
        assert llm.engine.has_unfinished_requests()  # its outputs wait for the next step()
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
    finally:
        llm.shutdown()
    assert request.finish_reason == "length" and request.num_output_tokens == 5


def test_an_engine_built_in_a_thread_outlives_that_thread(tiny_dir):
    built = []
    thread = threading.Thread(target=lambda: built.append(LLM(tiny_dir, device="cpu", engine_core_process=True)))
    thread.start()
    thread.join()
    llm = built[0]
    try:
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    finally:
        llm.shutdown()
    assert len(out[0].outputs[0].token_ids) == 4


def test_a_config_the_core_refuses_is_a_value_error(tiny_dir):
    with pytest.raises(ValueError, match="does not fit the KV cache") as info:
        LLM(tiny_dir, device="cpu", engine_core_process=True, num_kv_blocks=2, max_model_len=1024)
    assert "Traceback" not in str(info.value)


def test_server_reports_a_dead_core_at_once(tiny_dir):
    from test_server import http, running_server

    with running_server(tiny_dir, "--engine-core-process") as url:
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3}
        assert http("POST", url + "/v1/completions", body)[0] == 200
        status, stats = http("GET", url + "/stats")
        pid = stats["engine_core_process"]["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 5  # the pidfd fires at once; 5 s leaves room for a loaded box
        while http("GET", url + "/health", key=None)[0] == 200:
            assert time.time() < deadline, "/health still says ok after the core died"
            time.sleep(0.05)
        assert http("POST", url + "/v1/completions", body)[0] == 503
        assert http("GET", url + "/stats")[0] >= 500  # an answer, not a hang
