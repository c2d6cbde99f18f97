"""Issue 19 (part): presence/frequency/repetition penalties, min_tokens, logit_bias, include_stop_str_in_output.

repetition_penalty is checked token-exact against HF transformers' own logits processor (greedy, fp32);
the others against plain Python math over the same logits, then end to end through LLM.generate, the CLI's
argument parsing and both HTTP endpoints.
"""

import collections
import types

import numpy as np
import pytest
import torch
from conftest import random_prompts

from splitserve import LLM, SamplingParams
from splitserve.engine.sequence import Sequence
from splitserve.layers.sampler import SamplingTensors, apply_penalties, sample
from splitserve.worker.model_runner import ModelRunner

EOS = 2  # make_tiny_model's eos_token_id


# ---- the sampler against plain math ----
def _runner_stub(vocab: int):
    stub = types.SimpleNamespace(vocab_size=vocab, device=torch.device("cpu"), eos_token_ids=(EOS,),
                                 _to_device=torch.from_numpy, penalty_state=None, _batch_cache=None)
    stub._batch_rows = lambda seqs: ModelRunner._batch_rows(stub, seqs)
    stub._penalty_tensors = lambda seqs, prev=None: ModelRunner._penalty_tensors(stub, seqs, prev)
    return stub


def _oracle(logits: np.ndarray, seq: Sequence) -> np.ndarray:
    """One row processed the way the docs say, element by element."""
    p = seq.sampling_params
    row = logits.astype(np.float64).copy()
    for t, b in (p.logit_bias or {}).items():
        row[t] += b
    if seq.num_output_tokens < p.min_tokens:
        for t in set(p.stop_token_ids) | ({EOS} if not p.ignore_eos else set()):
            row[t] = -np.inf
    if p.repetition_penalty != 1:
        for t in set(seq.token_ids):
            row[t] = row[t] * p.repetition_penalty if row[t] < 0 else row[t] / p.repetition_penalty
    counts = collections.Counter(seq.output_token_ids)
    for t, c in counts.items():
        row[t] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    return row


def _seq(prompt, output, **kw) -> Sequence:
    s = Sequence(list(prompt) + list(output), SamplingParams(**kw), num_prompt_tokens=len(prompt))
    return s


def _rows(vocab: int):
    g = np.random.default_rng(0)
    rnd = lambda n: g.integers(0, vocab, n).tolist()  # noqa: E731
    return [
        _seq(rnd(7), [5, 5, 9, 5, 11], temperature=0, presence_penalty=0.7, frequency_penalty=0.4),
        _seq(rnd(5), rnd(6), temperature=0, repetition_penalty=1.3),
        _seq(rnd(4), [], temperature=0),  # no penalty in a batch that has some: untouched
        _seq(rnd(3), [8, 8], temperature=0, min_tokens=4, stop_token_ids=[17, 19], logit_bias={EOS: 50.0, 3: -7.5}),
        _seq(rnd(3), [8, 8], temperature=0, min_tokens=2, logit_bias={"21": 3.0}),  # reached: EOS free again
        _seq(rnd(6), [1, 4, 4, 4, 30, 1], temperature=0, presence_penalty=-1.5, frequency_penalty=2.0,
             repetition_penalty=0.8, logit_bias={4: 2.0}, min_tokens=9, ignore_eos=True, stop_token_ids=[30]),
    ]


def test_penalties_match_plain_math_and_greedy_takes_them():
    V = 64
    seqs = _rows(V)
    torch.manual_seed(0)
    logits = torch.randn(len(seqs), V) * 3
    st = SamplingTensors(None, None, None, None, [], True, 0, False, False, None,
                         **ModelRunner._penalty_tensors(_runner_stub(V), seqs))
    got = apply_penalties(logits, st).double().numpy()
    want = np.stack([_oracle(logits[i].numpy(), s) for i, s in enumerate(seqs)])
    assert np.array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got[2], logits[2].numpy())
    assert np.isneginf(got[3, [EOS, 17, 19]]).all() and np.isfinite(got[4, EOS]) and np.isfinite(got[5, EOS])
    tokens, info = sample(logits, st)  # greedy rows argmax the processed logits
    assert tokens.tolist() == want.argmax(axis=1).tolist()
    assert info is None


def test_sampled_rows_take_penalties_and_logprobs_stay_raw():
    V = 64
    seqs = [_seq([1, 2, 3], [], temperature=1.0, logit_bias={40: 100.0}, logprobs=2),
            _seq([1, 2, 3], [], temperature=0.5, top_k=5, top_p=0.9, logit_bias={41: 100.0}, logprobs=2)]
    logits = torch.randn(2, V)
    params = [s.sampling_params for s in seqs]
    st = SamplingTensors(torch.tensor([p.temperature for p in params]), torch.tensor([5, 5]),
                         torch.tensor([1.0, 0.9]), torch.zeros(2), [None, None], False, 5, True, False, 2,
                         **ModelRunner._penalty_tensors(_runner_stub(V), seqs))
    tokens, (chosen, _rank, _top) = sample(logits, st)
    assert tokens.tolist() == [40, 41]
    torch.testing.assert_close(chosen, logits.log_softmax(-1)[[0, 1], [40, 41]])  # raw, before the bias


def test_per_request_sampling_tensors_are_kept_while_the_batch_is_the_same():
    stub = _runner_stub(8)
    a, b = _seq([1], [], temperature=0.5, top_k=3), _seq([2], [], temperature=1.5, presence_penalty=0.5)
    first = ModelRunner._sampling_tensors(stub, [a, b])
    again = ModelRunner._sampling_tensors(stub, [a, b])
    assert again.temperature is first.temperature  # not rebuilt, nor uploaded again
    assert again.presence.data_ptr() == first.presence.data_ptr()  # a row of the same factors
    swapped = ModelRunner._sampling_tensors(stub, [b, a])  # other rows: rebuilt, in the new order
    assert swapped.temperature.tolist() == [1.5, 0.5] and swapped.top_k.tolist() == [0, 3]
    assert swapped.presence.tolist() == [0.5, 0.0]


def test_no_penalty_keeps_the_fast_path():
    st = ModelRunner._sampling_tensors(_runner_stub(8), [_seq([1, 2], [3], temperature=0)])
    assert st.all_greedy and not st.any_penalty and st.counts is None and st.seen is None


# ---- validation ----
@pytest.mark.parametrize("kw,field", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=-1), "repetition_penalty"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=17, max_tokens=16), "min_tokens"),
    (dict(min_tokens=1.5), "min_tokens"), (dict(logit_bias={5: 101}), "logit_bias"),
    (dict(logit_bias={-1: 1}), "logit_bias"), (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(logit_bias=[1, 2]), "logit_bias"), (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
])
def test_bad_values_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kw)


# ---- end to end ----
@pytest.fixture(scope="module")
def tiny_dir(make_tiny_model):
    return make_tiny_model("qwen3", seed=5)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(tiny_dir, kvcache_block_size=8, max_num_batched_tokens=256)


def _ids(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_repetition_penalty_matches_hf_greedy(tiny_dir, llm):
    from transformers import AutoModelForCausalLM

    prompts = random_prompts(3, 4, 20, seed=7)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, min_new_tokens=24,
                            do_sample=False, repetition_penalty=1.3, eos_token_id=None, pad_token_id=0)
            expected.append(y[0, len(ids):].tolist())
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3)
    plain = _ids(llm, prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert plain != expected  # the penalty changes this model's output, so the comparison means something
    assert _ids(llm, prompts, params) == expected  # batched
    assert [_ids(llm, [p], params)[0] for p in prompts] == expected  # one at a time
    mixed = _ids(llm, prompts[:2], [params, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)])
    assert mixed == [expected[0], plain[1]]  # a row without penalties is untouched by its neighbour's


def test_logit_bias_forces_a_token_greedy_and_sampled(llm):
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, max_tokens=6, ignore_eos=True, logit_bias={1234: 100},
                                seed=1)
        assert _ids(llm, [[5, 6, 7]], params) == [[1234] * 6]
    with pytest.raises(ValueError, match="logit_bias token ids outside the vocabulary"):
        llm.generate([[5, 6]], SamplingParams(logit_bias={49152: 1.0}), use_tqdm=False)


def test_frequency_and_presence_penalties_end_to_end(llm):
    """Two tokens biased far above the rest (this tiny model's raw logits spread over less than 1): the oracle
    is the arithmetic on the biases alone."""
    freq = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={1234: 40, 1235: 35},
                          frequency_penalty=2.0)  # 40 - 2k vs 35 - 2j
    # 40 vs 35, 38 vs 35, 36 vs 35, 34 vs 35 -> 1235, 34 vs 33 -> 1234, 32 vs 33 -> 1235
    assert _ids(llm, [[5, 6, 7]], freq)[0] == [1234, 1234, 1234, 1235, 1234, 1235]
    pres = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={1234: 40, 1235: 38.5},
                          presence_penalty=2.0)  # 40 vs 38.5, 38 vs 38.5, 38 vs 36.5, then 1234 stays
    assert _ids(llm, [[5, 6, 7]], pres)[0] == [1234, 1235, 1234, 1234, 1234, 1234]


def test_min_tokens_holds_off_eos_and_stop_ids(llm):
    eos_now = SamplingParams(temperature=0, max_tokens=20, logit_bias={EOS: 100})
    assert _ids(llm, [[5, 6, 7]], eos_now) == [[EOS]]
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=20, logit_bias={EOS: 100},
                                                   min_tokens=5), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 6 and EOS not in out.token_ids[:5] and out.token_ids[5] == EOS  # 5, then EOS
    assert out.finish_reason == "stop"
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=1.0, seed=3, max_tokens=20, logit_bias={777: 100},
                                                   stop_token_ids=[777], min_tokens=3), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4 and 777 not in out.token_ids[:3] and out.stop_reason == 777


def test_stop_strings_wait_for_min_tokens_and_can_stay_in_the_text(llm):
    tok = llm.engine.tokenizer
    word = tok.encode(" hello")
    assert len(word) == 1
    force = {word[0]: 100.0}

    def run(**kw):
        return llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop="hello",
                                                          logit_bias=force, **kw), use_tqdm=False)[0].outputs[0]

    out = run()
    assert out.text == " " and out.finish_reason == "stop" and out.stop_reason == "hello"
    assert run(include_stop_str_in_output=True).text == " hello"
    out = run(min_tokens=3)
    assert len(out.token_ids) == 3 and out.text == " hello hello "
    assert run(min_tokens=3, include_stop_str_in_output=True).text == " hello hello hello"


def test_cli_flags_reach_sampling_params():
    from splitserve.cli import build_parser, sampling_params

    args = build_parser().parse_args(["generate", "hi", "--presence-penalty", "0.5", "--frequency-penalty", "0.25",
                                      "--repetition-penalty", "1.2", "--min-tokens", "3",
                                      "--logit-bias", '{"50": -100, "7": 2.5}'])
    p = sampling_params(args)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_tokens) == (0.5, 0.25, 1.2, 3)
    assert p.logit_bias == {50: -100.0, 7: 2.5}


# ---- HTTP ----
@pytest.fixture(scope="module")
def server(tiny_dir):
    from test_server import running_server

    with running_server(tiny_dir) as url:
        yield url


def test_server_takes_the_fields_and_names_a_bad_one(server):
    from test_server import http

    fields = {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2, "min_tokens": 4,
              "logit_bias": {str(EOS): 100}, "include_stop_str_in_output": True, "temperature": 0,
              "max_tokens": 8}
    status, body = http("POST", server + "/v1/completions", {"prompt": [5, 6, 7], **fields})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "stop"
    status, body = http("POST", server + "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "hi"}], **fields})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 5
    for endpoint, bad, field in [("completions", {"presence_penalty": 3}, "presence_penalty"),
                                 ("chat/completions", {"logit_bias": {"5": 500}}, "logit_bias"),
                                 ("completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
                                 ("chat/completions", {"repetition_penalty": 0}, "repetition_penalty"),
                                 ("completions", {"min_tokens": 9}, "min_tokens")]:
        body = {"prompt": [5, 6, 7], "max_tokens": 8, **bad} if endpoint == "completions" else \
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **bad}
        status, got = http("POST", f"{server}/v1/{endpoint}", body)
        assert status == 400, (bad, got)
        assert field in got["error"]["message"], got


def test_logit_bias_tensors_are_reused_only_while_the_batch_keeps_its_rows():
    stub = _runner_stub(64)
    a, b = (_seq([1, 2], [], logit_bias={5: 1.0, 6: -2.0}), _seq([3], [], logit_bias={7: 3.0}))
    first = ModelRunner._penalty_tensors(stub, [a, b])["bias"]
    assert ModelRunner._penalty_tensors(stub, [a, b])["bias"] is first  # same requests, same rows: reused
    swapped = ModelRunner._penalty_tensors(stub, [b, a])["bias"]
    assert swapped is not first and swapped[0].tolist() == [0, 1, 1] and swapped[1].tolist() == [7, 5, 6]
    c = _seq([4], [], logit_bias={9: 1.0})  # a new request in a row: rebuilt
    assert ModelRunner._penalty_tensors(stub, [a, c])["bias"][1].tolist() == [5, 6, 9]
