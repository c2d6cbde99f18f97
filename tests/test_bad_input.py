"""Bad input gets a clear error naming the problem, raised before any work; the engine keeps serving."""

import json
import os
import shutil

import pytest

from splitserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(make_tiny_model):
    return LLM(make_tiny_model("qwen3"), max_model_len=64, kvcache_block_size=8)


@pytest.mark.parametrize("prompt, message", [
    ("", "prompt is empty"),
    ([], "prompt is empty"),
    ([5] * 64, "max_model_len is 64"),
    ([5, -1, 7], "outside the vocabulary"),
    ([5, 49152], "outside the vocabulary"),
    (3.5, "a prompt must be"),
])
def test_bad_prompts_rejected_before_any_work(llm, prompt, message):
    good = [1, 2, 3, 4]
    with pytest.raises((ValueError, TypeError), match=message) as info:
        llm.generate([good, prompt], GREEDY, use_tqdm=False)
    assert "prompt 1" in str(info.value)
    assert not llm.engine.has_unfinished_requests() and not llm.engine.requests
    assert llm.generate([good], GREEDY, use_tqdm=False)[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_p=2.0), "min_p"),
    (dict(stop=[""]), "stop"),
    (dict(logprobs=-1), "logprobs"),
    # bounded, not just typed: these used to overflow inside an engine step, failing the whole batch
    (dict(seed=2**64), "seed"),
    (dict(seed=2**63), "seed"),
    (dict(seed=-(2**63) - 1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(top_k=2**63), "top_k"),
    (dict(top_k=2**31), "top_k"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=1e308), "temperature"),
    (dict(temperature=100.5), "temperature"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(min_p=float("nan")), "min_p"),
    (dict(logprobs=21), "logprobs"),
    (dict(max_tokens=True), "max_tokens"),
])
def test_invalid_sampling_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("field, value", [("top_k", 1.5), ("top_k", 10**30), ("min_p", 2.0), ("temperature", -1.0),
                                          ("logprobs", 10**6), ("n", 0), ("top_p", float("nan"))])
def test_a_field_changed_after_building_is_checked_again(llm, field, value):
    """The checks run when a SamplingParams is built; a field set afterwards is checked when the request is made,
    before any work, so it cannot fail the other requests of the call (it did: a TypeError inside the step)."""
    bad = SamplingParams(temperature=1.0, max_tokens=4, seed=0)
    setattr(bad, field, value)
    with pytest.raises(ValueError, match=field) as info:
        llm.generate([[1, 2, 3, 4], [1, 2, 3, 4]], [GREEDY, bad], use_tqdm=False)
    assert "prompt 1" in str(info.value)
    assert not llm.engine.has_unfinished_requests() and not llm.engine.requests
    assert llm.generate([[1, 2, 3, 4]], GREEDY, use_tqdm=False)[0].outputs[0].finish_reason == "length"


def test_a_request_keeps_the_values_it_was_made_with(llm):
    """The engine takes its own copy: changing the caller's SamplingParams after submitting changes nothing."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    request = llm.engine.make_request([1, 2, 3, 4], params)
    params.max_tokens, params.temperature = 1, 1.0
    assert request.sampling_params.max_tokens == 6 and request.sampling_params.temperature == 0


def test_numpy_scalars_are_taken_as_python_numbers(llm):
    """A seed from np.random or a float32 top_p is a number like any other (kept as a Python int / float), with the
    same checks: the output equals the one made with Python values."""
    import numpy as np

    given = SamplingParams(temperature=np.float32(0.5), top_p=np.float32(0.75), top_k=np.int64(20),
                           seed=np.int64(7), max_tokens=np.int32(5), ignore_eos=True)
    plain = SamplingParams(temperature=0.5, top_p=float(np.float32(0.75)), top_k=20, seed=7, max_tokens=5,
                           ignore_eos=True)
    assert type(given.seed) is int and type(given.top_p) is float and type(given.max_tokens) is int
    outs = llm.generate([[1, 2, 3, 4]] * 2, [given, plain], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids and len(outs[0].outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="temperature must be"):
        SamplingParams(temperature=np.float32("nan"))
    # inside lists and dicts, and whole arrays
    listed = SamplingParams(stop_token_ids=np.array([5, 6]), stop=np.array(["x", "y"]),
                            logit_bias={np.int64(5): np.float32(1.5)}, include_stop_str_in_output=np.bool_(True))
    assert (listed.stop_token_ids, listed.stop_list, listed.logit_bias) == ([5, 6], ["x", "y"], {5: 1.5})
    assert listed.include_stop_str_in_output is True
    # prompts of numpy ids (a list of them, or an array) are the same prompt
    ids = [1, 2, 3, 4]
    p = SamplingParams(temperature=0, max_tokens=3)
    outs = llm.generate([ids, [np.int64(t) for t in ids], {"prompt_token_ids": np.array(ids)}], p, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids


@pytest.mark.parametrize("prompt, message", [([1, 2.0], "must be integers"), ([True, 2], "must be integers"),
                                             (["1"], "must be integers"), ([1, 10**9], "outside the vocabulary")])
def test_prompt_ids_that_are_not_token_ids_are_named(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)


@pytest.mark.parametrize("field", ["ignore_eos", "skip_special_tokens", "include_stop_str_in_output"])
@pytest.mark.parametrize("value", [None, "no", 0, [1]])
def test_flags_must_be_true_or_false(field, value):
    with pytest.raises(ValueError, match=f"{field} must be true or false"):
        SamplingParams(**{field: value})


def test_sampling_values_at_their_bounds_run(llm):
    """The extremes of each range reach the sampler and work (torch.Generator takes any signed 64-bit seed)."""
    params = [SamplingParams(temperature=0.8, seed=seed, top_k=top_k, max_tokens=4, ignore_eos=True, logprobs=20)
              for seed, top_k in ((-(2**63), 2**31 - 1), (2**63 - 1, 0), (0, 1))]
    params.append(SamplingParams(temperature=100.0, top_p=1e-9, min_p=1.0, max_tokens=4, ignore_eos=True))
    outs = llm.generate([[1, 2, 3, 4]] * len(params), params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)


def test_tiny_temperature_is_raised_to_a_floor(llm):
    """Below ~1e-38, logits / temperature overflows float32 and the sampler picked token 0 every time."""
    assert SamplingParams(temperature=1e-39).temperature == SamplingParams(temperature=0.01).temperature == 0.01
    cold = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=1e-39, max_tokens=4, ignore_eos=True, seed=1),
                        use_tqdm=False)[0].outputs[0].token_ids
    assert cold != [0, 0, 0, 0]


def test_unknown_engine_arg_named(make_tiny_model):
    with pytest.raises(TypeError, match="max_num_seq\\b"):
        LLM(make_tiny_model("qwen3"), max_num_seq=4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="float8"), "dtype"), (dict(device="tpu"), "device"), (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"), (dict(kvcache_block_size=0), "kvcache_block_size"),
])
def test_invalid_engine_values(make_tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(make_tiny_model("qwen3"), **kwargs)


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        LLM(str(tmp_path / "does-not-exist"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM(str(tmp_path))


def test_unsupported_architecture(make_tiny_model, tmp_path):
    path = shutil.copytree(make_tiny_model("qwen3"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model architecture 'GPT2LMHeadModel'"):
        LLM(str(path))


def test_truncated_safetensors(make_tiny_model, tmp_path):
    path = shutil.copytree(make_tiny_model("qwen3"), tmp_path / "m")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated safetensors file .*model.safetensors"):
        LLM(str(path))


def test_missing_weights_named(make_tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    path = shutil.copytree(make_tiny_model("qwen3"), tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj.weight"):
        LLM(str(path))


def test_corrupt_gguf(tmp_path, default_model_dir):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(ValueError, match="cannot read GGUF file .*broken.gguf"):
        LLM(str(bad))


@pytest.mark.parametrize("size, message", [
    (1 << 16, r"truncated or corrupt: its header \(metadata and tensor list\) runs to byte [\d,]+ but the file "
              r"has 65,536 bytes"),
    (2 << 20, r"truncated or corrupt: tensor 'token_embd.weight' \(Q8_0, 49152x576\) needs bytes [\d,]+ to "
              r"[\d,]+ but the file has 2,097,152 bytes"),
    (-10, r"truncated or corrupt: tensor '[\w.]+' .* but the file has [\d,]+ bytes"),
])
def test_truncated_gguf_named(tmp_path, default_model_dir, size, message):
    """A cut GGUF file says so, naming the file and the tensor cut (not numpy's 'cannot reshape array')."""
    from splitserve.models.loader import default_model_gguf

    truncated = tmp_path / "truncated.gguf"
    with open(default_model_gguf(), "rb") as f:
        data = f.read()
    truncated.write_bytes(data[:size])
    with pytest.raises(ValueError, match="cannot read GGUF file .*truncated.gguf.*: the file is " + message):
        LLM(str(truncated))


def test_string_prompt_without_tokenizer(make_tiny_model, tmp_path):
    path = shutil.copytree(make_tiny_model("qwen3"), tmp_path / "m")
    for name in os.listdir(path):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(path / name)
    llm = LLM(str(path))
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate(["hello"], GREEDY, use_tqdm=False)
    assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 4


def test_a_tokenizer_larger_than_the_model_is_refused_per_request(make_tiny_model):
    """A text prompt whose token ids fall outside the model's vocabulary (a tokenizer that does not fit the
    model) is a ValueError for that request, before any work; token-id prompts inside it still run."""
    llm = LLM(make_tiny_model("qwen3", seed=4, vocab_size=256), device="cpu")
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        llm.generate(["zebra crossing"], SamplingParams(max_tokens=2), use_tqdm=False)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2 and llm.stats()["kv_used_blocks"] == 0
