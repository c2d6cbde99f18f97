"""The OpenAI-compatible server over real HTTP on loopback, driven by the official `openai` client.

One server process (tiny random-weight model, API key on) serves every test in this module; the
fixture checks that it stops cleanly and leaves no process behind.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import hf_greedy, random_prompts

openai = pytest.importorskip("openai")
API_KEY = "test-key-123"
MAX_MODEL_LEN = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, key: str | None = API_KEY, raw: bytes | None = None):
    """Plain urllib request → (status, parsed JSON or text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status, payload = resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read().decode()
    try:
        return status, json.loads(payload)
    except json.JSONDecodeError:
        return status, payload


def sse_chunks(lines):
    """The JSON chunks of a server-sent-event stream (byte lines), up to [DONE]; an error chunk fails."""
    for line in lines:
        line = line.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        assert "error" not in chunk, chunk
        yield chunk


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_model):
    return make_tiny_model("llama", seed=3, num_hidden_layers=2)


@contextlib.contextmanager
def running_server(model_dir: str, *extra_args: str, api_key: str = API_KEY, positional: bool = False):
    """`splitserve serve` on a free loopback port (API key on) → its URL; on exit it must stop cleanly on SIGINT
    and leave no process or listening socket behind. positional: the model as `serve MODEL`, not --model."""
    port = _free_port()
    model_args = [model_dir] if positional else ["--model", model_dir]
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitserve", "serve", *model_args, "--device", "cpu", "--port", str(port),
         "--api-key", api_key, "--served-model-name", "tiny", "--max-model-len", str(MAX_MODEL_LEN),
         "--log-level", "warning", *extra_args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None, f"server exited early:\n{proc.stdout.read()}"
        try:
            if http("GET", url + "/health", key=None)[0] == 200:
                break
        except OSError:
            pass
        assert time.time() < deadline, "server did not come up in 180 s"
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("server did not stop within 30 s of SIGINT")
        log = proc.stdout.read()
        assert proc.returncode == 0, log
        assert not _alive(proc.pid)
        with socket.socket() as s:  # nothing listens on the port any more (TIME_WAIT leftovers are fine)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))


@pytest.fixture(scope="module")
def server(tiny_dir):
    with running_server(tiny_dir) as url:
        yield url


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)


def wait_idle(url: str, timeout: float = 60.0) -> dict:
    deadline = time.time() + timeout
    while True:
        stats = http("GET", url + "/stats")[1]
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        assert time.time() < deadline, f"engine not idle after {timeout} s: {stats}"
        time.sleep(0.1)


def finished_counts(url: str) -> dict[str, float]:
    text = http("GET", url + "/metrics")[1]
    return {m[0]: float(m[1]) for m in re.findall(r'splitserve_requests_finished_total\{finish_reason="(\w+)"\} (\S+)',
                                                   text)}


def test_completions_match_hf_and_stream_equals_non_stream(server, tiny_dir):
    c = client(server)
    prompts = random_prompts(3, 5, 40, seed=11)
    expected = hf_greedy(tiny_dir, prompts, 24)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(tiny_dir)
    for prompt, ref in zip(prompts, expected):
        full = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                    extra_body={"ignore_eos": True})
        assert full.choices[0].text == tok.decode(ref, skip_special_tokens=True)
        assert full.choices[0].finish_reason == "length"
        assert full.usage.prompt_tokens == len(prompt) and full.usage.completion_tokens == 24
        chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
        assert chunks[-1].usage.completion_tokens == 24 and len(chunks) > 3
    # several prompts in one request come back as indexed choices
    multi = c.completions.create(model="tiny", prompt=prompts[:2], max_tokens=24, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert [ch.index for ch in multi.choices] == [0, 1]
    assert [ch.text for ch in multi.choices] == [tok.decode(r, skip_special_tokens=True) for r in expected[:2]]


def test_chat_stream_equals_non_stream_and_logprobs(server):
    c = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    full = c.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                     logprobs=True, top_logprobs=2)
    assert full.choices[0].message.role == "assistant"
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    for entry in content:  # the chosen token's logprob is at most the best alternative's, and <= 0
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy picks the top token
    stream = c.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_stop_string_never_leaks_into_the_stream(server):
    c = client(server)
    prompt = random_prompts(1, 8, 8, seed=5)[0]
    free = c.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    stop = free[len(free) // 2: len(free) // 2 + 3]
    assert len(stop) == 3
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt=prompt, max_tokens=30, temperature=0, stream=True, stop=[stop],
        extra_body={"ignore_eos": True}) if ch.choices)
    assert streamed == free[: free.index(stop)]


def test_64_concurrent_streams_half_aborted(server, tiny_dir):
    """64 streaming clients at once; 32 hang up after 3 chunks. Those are aborted (blocks freed, engine idle)
    and the other 32 finish with the HF reference output."""
    prompts = random_prompts(64, 4, 30, seed=21)
    keep = prompts[:32]
    expected = hf_greedy(tiny_dir, keep, 16)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(tiny_dir)
    before = finished_counts(server)

    async def run():
        ac = openai.AsyncOpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)

        async def full(prompt):
            stream = await ac.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
            return "".join([ch.choices[0].text async for ch in stream if ch.choices])

        async def hang_up(prompt):
            # long enough (480 tokens) that it cannot finish before the test ends unless it is aborted
            stream = await ac.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_MODEL_LEN - 32,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
            n = 0
            async for _ in stream:
                n += 1
                if n == 3:
                    break
            await stream.close()
            return n

        results = await asyncio.gather(*(full(p) for p in keep), *(hang_up(p) for p in prompts[32:]))
        await ac.close()
        return results

    results = asyncio.run(run())
    assert results[:32] == [tok.decode(r, skip_special_tokens=True) for r in expected]
    assert results[32:] == [3] * 32
    stats = wait_idle(server, timeout=60)
    assert stats["kv_used_blocks"] == 0, stats
    after = finished_counts(server)
    assert after.get("abort", 0) - before.get("abort", 0) == 32
    assert after.get("length", 0) - before.get("length", 0) == 32


BAD_REQUESTS = [
    # (what, endpoint, body or raw bytes, status, error code or None, words in the message)
    ("malformed JSON", "completions", b'{"prompt": "hi", ', 400, None, "JSON"),
    ("unknown model", "completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model_not_found", "gpt-9"),
    ("prompt too long", "completions", {"prompt": [5] * MAX_MODEL_LEN}, 400, "context_length_exceeded",
     "max_model_len"),
    ("empty prompt", "completions", {"prompt": ""}, 400, None, "empty"),
    ("token id outside vocab", "completions", {"prompt": [1, 10**9]}, 400, None, "vocabulary"),
    ("negative temperature", "completions", {"prompt": "hi", "temperature": -1}, 400, None, "temperature"),
    ("top_p zero", "completions", {"prompt": "hi", "top_p": 0}, 400, None, "top_p"),
    ("max_tokens zero", "completions", {"prompt": "hi", "max_tokens": 0}, 400, None, "max_tokens"),
    ("n too large", "completions", {"prompt": "hi", "n": 1000}, 400, None, "n"),
    ("n zero", "chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, None, "n"),
    ("best_of", "completions", {"prompt": "hi", "best_of": 3}, 400, None, "best_of"),
    ("prompt_logprobs too many", "completions", {"prompt": "hi", "prompt_logprobs": 21}, 400, None,
     "prompt_logprobs"),
    ("unknown field", "completions", {"prompt": "hi", "frobnicate": 1}, 400, None, "frobnicate"),
    ("wrong type", "completions", {"prompt": "hi", "max_tokens": "many"}, 400, None, "max_tokens"),
    ("missing messages", "chat/completions", {"model": "tiny"}, 400, None, "messages"),
    ("bad role", "chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None, "role"),
]


@pytest.mark.parametrize("what,endpoint,body,status,code,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, what, endpoint, body, status, code, words):
    url = f"{server}/v1/{endpoint}"
    got_status, got = (http("POST", url, raw=body) if isinstance(body, bytes) else http("POST", url, body))
    assert got_status == status, got
    err = got["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    assert words.lower() in err["message"].lower(), err
    ok_status, ok = http("POST", server + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert ok_status == 200 and ok["usage"]["completion_tokens"] == 2


def test_null_sampling_fields_take_their_defaults(server):
    """OpenAI's API and vLLM accept null for these; it means the default (greedy output stays the same)."""
    body = {"prompt": "hi", "max_tokens": 4, "temperature": 0}
    status, want = http("POST", server + "/v1/completions", body)
    assert status == 200
    nulls = dict.fromkeys(["top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"])
    status, got = http("POST", server + "/v1/completions", {**body, **nulls})
    assert status == 200, got
    assert got["choices"][0]["text"] == want["choices"][0]["text"]


def test_a_field_outside_the_vocabulary_is_named(server):
    for field, value in (("logit_bias", {"999999": 5}), ("stop_token_ids", [999999])):
        status, got = http("POST", server + "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: value})
        assert status == 400 and got["error"]["param"] == field, got


def test_api_key_is_checked(server):
    for key in (None, "wrong"):
        status, body = http("GET", server + "/v1/models", key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, _ = http("POST", server + "/v1/completions", {"prompt": "hi"}, key=key)
        assert status == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert http("GET", server + "/health", key=None)[0] == 200  # liveness probes need no key
    assert http("GET", server + "/v1/models")[0] == 200


def test_metrics_exposes_engine_state(server):
    client(server).completions.create(model="tiny", prompt="hello", max_tokens=3)
    status, text = http("GET", server + "/metrics")
    assert status == 200
    for name in ("splitserve_time_to_first_token_seconds_bucket", "splitserve_inter_token_latency_seconds_bucket",
                 "splitserve_num_requests_running", "splitserve_num_requests_waiting",
                 "splitserve_kv_cache_usage_ratio",
                 'splitserve_decode_path_info{compute_sm="",memory_sm="",path="eager"}', "splitserve_pd_decode_sm 0.0",
                 'splitserve_http_requests_total{endpoint="/v1/completions",status="200"}'):
        assert name in text, name
    # serve froze its start-up heap: a full garbage collection would otherwise stall every stream
    assert http("GET", server + "/stats")[1]["gc_frozen_objects"] > 10_000


def test_bench_serve_writes_results(server, tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "splitserve", "bench", "serve", "--url", server, "--api-key", API_KEY,
         "--num-requests", "12", "--input-range", "8", "32", "--output-range", "4", "12", "--request-rates",
         "20", "inf", "--max-concurrency", "8", "--out", str(tmp_path), "--name", "serve-test"],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "serve-test.json").read_text())
    assert [run["request_rate"] for run in result["runs"]] == [20.0, "inf"]
    for run in result["runs"]:
        assert run["num_errors"] == 0 and run["num_requests"] == 12
        assert all(4 <= rec["output_len"] <= 12 for rec in run["records"])
        assert run["ttft_s"]["p50"] > 0 and run["tpot_s"]["p99"] >= run["tpot_s"]["p50"]
    assert (tmp_path / "serve-test.png").exists() and "goodput" in (tmp_path / "serve-test.md").read_text()


def test_non_streaming_client_disconnect_aborts(server):
    before = finished_counts(server)
    body = json.dumps({"prompt": [7, 8, 9], "max_tokens": MAX_MODEL_LEN - 8, "ignore_eos": True}).encode()
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.time() + 30
        while http("GET", server + "/stats")[1]["running"] == 0:  # wait until it is being generated
            assert time.time() < deadline
            time.sleep(0.02)
    stats = wait_idle(server, timeout=30)
    assert stats["kv_used_blocks"] == 0
    after = finished_counts(server)
    assert after.get("abort", 0) - before.get("abort", 0) == 1
    assert after.get("length", 0) == before.get("length", 0)


def test_n_completions_and_prompt_logprobs(server):
    c = client(server)
    r = c.completions.create(model="tiny", prompt=["Hello there", "Good"], n=3, max_tokens=5, seed=3, temperature=1.0,
                             extra_body={"ignore_eos": True, "prompt_logprobs": 1})
    assert sorted(ch.index for ch in r.choices) == list(range(6))  # prompt-major, as OpenAI's
    assert r.usage.completion_tokens == 30
    singles = [c.completions.create(model="tiny", prompt=p, max_tokens=1).usage.prompt_tokens
               for p in ("Hello there", "Good")]
    assert r.usage.prompt_tokens == sum(singles)  # each prompt counted once, not n times
    pl = r.choices[0].model_extra["prompt_logprobs"]
    assert pl[0] is None and len(pl) == singles[0] and all(set(e) >= {"logprob", "rank", "decoded_token"}
                                                          for entry in pl[1:] for e in entry.values())
    # streamed chat: every choice gets its role, its text and its finish, and equals its seed's single request
    messages = [{"role": "user", "content": "hi"}]
    stream = c.chat.completions.create(model="tiny", messages=messages, n=2, max_tokens=4, seed=1, temperature=1.0,
                                       stream=True, extra_body={"ignore_eos": True})
    text, roles, finished = {0: "", 1: ""}, set(), set()
    for chunk in stream:
        for ch in chunk.choices:
            text[ch.index] += ch.delta.content or ""
            roles |= {ch.index} if ch.delta.role else set()
            finished |= {ch.index} if ch.finish_reason else set()
    assert roles == finished == {0, 1}
    single = [c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, seed=1 + i, temperature=1.0,
                                        extra_body={"ignore_eos": True}).choices[0].message.content for i in range(2)]
    assert [text[0], text[1]] == single
