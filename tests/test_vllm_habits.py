"""vLLM's habits (issue 19): `splitserve serve MODEL`, `--dtype half`, /version, /tokenize, /detokenize,
/v1/models/{id} and a real `created` time, over real HTTP against a server started the vLLM way."""

import subprocess
import sys
import time

import pytest
import torch
from conftest import hf_greedy, random_prompts
from test_server import MAX_MODEL_LEN, http, running_server

import splitserve


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_model):
    return make_tiny_model("llama", seed=3, num_hidden_layers=2)


@pytest.fixture(scope="module")
def started():
    return int(time.time())


@pytest.fixture(scope="module")
def server(tiny_dir, started):
    with running_server(tiny_dir, positional=True) as url:  # `splitserve serve MODEL ...`, as `vllm serve MODEL`
        yield url


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return __import__("transformers").AutoTokenizer.from_pretrained(tiny_dir)


def test_positional_model_is_served(server, tiny_dir, tok):
    status, body = http("GET", server + "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]
    # the positional folder's weights answer (not the default model's)
    prompt = random_prompts(1, 5, 20, seed=5)[0]
    ref = hf_greedy(tiny_dir, [prompt], 8)[0]
    status, out = http("POST", server + "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 8,
                                                           "temperature": 0, "ignore_eos": True})
    assert status == 200, out
    assert out["choices"][0]["text"] == tok.decode(ref, skip_special_tokens=True)


def test_positional_and_flag_disagree_is_a_clear_error(tiny_dir):
    proc = subprocess.run([sys.executable, "-m", "splitserve", "serve", tiny_dir, "--model", tiny_dir + "-other",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "two models given" in proc.stderr and "--model" in proc.stderr


def test_serve_parser_positional_flag_and_default():
    from splitserve.cli import build_parser, serve_model

    parser = build_parser()
    assert serve_model(parser.parse_args(["serve"])) is None  # the default model
    assert serve_model(parser.parse_args(["serve", "m", "--port", "1"])) == "m"
    assert serve_model(parser.parse_args(["serve", "--model", "m"])) == "m"
    assert serve_model(parser.parse_args(["serve", "m", "--model", "m"])) == "m"
    with pytest.raises(ValueError, match="two models given"):
        serve_model(parser.parse_args(["serve", "a", "--model", "b"]))


def test_dtype_aliases(tiny_dir):
    from splitserve import LLM
    from splitserve.config import EngineConfig

    assert EngineConfig(dtype="half").dtype == "float16"
    assert EngineConfig.from_kwargs(None, dtype="float").dtype == "float32"
    assert EngineConfig(dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        EngineConfig(dtype="bf17")
    llm = LLM(tiny_dir, device="cpu", dtype="half", num_kv_blocks=16, max_model_len=64)
    try:
        assert llm.engine.core.runner.dtype == torch.float16
    finally:
        llm.engine.shutdown()


def test_version(server):
    assert http("GET", server + "/version") == (200, {"version": splitserve.__version__})
    assert http("GET", server + "/version", key=None)[0] == 401  # behind the API key like the rest


def test_tokenize_detokenize_round_trip_equals_hf(server, tok):
    text = "Hello, world! Ünïcödé ✓ — tokenize me, please.\n  twice  "
    for special in (True, False):
        status, body = http("POST", server + "/tokenize", {"prompt": text, "add_special_tokens": special,
                                                           "model": "tiny"})
        assert status == 200, body
        ids = tok.encode(text, add_special_tokens=special)
        assert body == {"tokens": ids, "count": len(ids), "max_model_len": MAX_MODEL_LEN}
        status, back = http("POST", server + "/detokenize", {"tokens": body["tokens"]})
        assert status == 200 and back == {"prompt": tok.decode(ids)}
    messages = [{"role": "user", "content": "hi there"}]
    status, body = http("POST", server + "/tokenize", {"messages": messages})
    assert status == 200, body
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert body["tokens"] == tok.encode(rendered, add_special_tokens=False)
    assert http("POST", server + "/tokenize", {"prompt": "x"}, key=None)[0] == 401


def test_tokenize_detokenize_errors(server):
    for bad_body in ({}, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}):
        status, body = http("POST", server + "/tokenize", bad_body)
        assert status == 400 and body["error"]["type"] == "invalid_request_error", body
    status, body = http("POST", server + "/tokenize", {"prompt": "a", "model": "other"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = http("POST", server + "/detokenize", {"tokens": [5, 49152, -1, 7]})
    assert status == 400 and body["error"]["param"] == "tokens", body
    assert "49152" in body["error"]["message"] and "-1" in body["error"]["message"]
    status, body = http("POST", server + "/detokenize", {"tokens": ["5"]})  # strict: no strings for ids
    assert status == 400 and "error" in body


def test_model_by_id_and_created(server, started):
    status, listing = http("GET", server + "/v1/models")
    card = listing["data"][0]
    assert started - 300 <= card["created"] <= int(time.time())  # the server's start, not 0
    assert http("GET", server + "/v1/models/tiny") == (200, card)
    status, body = http("GET", server + "/v1/models/other-model")
    assert status == 404 and body["error"]["code"] == "model_not_found" and "other-model" in body["error"]["message"]
    assert http("GET", server + "/v1/models/tiny", key=None)[0] == 401
    metrics = http("GET", server + "/metrics")[1]
    assert 'endpoint="/v1/models/{model_id}"' in metrics and 'endpoint="/tokenize"' in metrics
