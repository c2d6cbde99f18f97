"""The incremental penalty state (worker/penalties.py): after any history of steps its rows equal the seen /
count tensors built from scratch from the token ids; and end to end, preemption and aborts change no
penalised output."""

import numpy as np
import pytest
import torch
from conftest import random_prompts

from splitserve import LLM, SamplingParams
from splitserve.engine.sequence import PLACEHOLDER, Sequence
from splitserve.worker import penalties
from splitserve.worker.penalties import PenaltyState

V = 50
PEN = SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5)


def _dense(seqs, used):
    seen = torch.zeros(len(seqs), V, dtype=torch.bool)
    counts = torch.zeros(len(seqs), V)
    for i, (s, u) in enumerate(zip(seqs, used)):
        if u:
            seen[i, s.token_ids] = True
            for t in s.output_token_ids:
                counts[i, t] += 1
    return seen, counts


def _check(state, seqs, used=None):
    used = used or [True] * len(seqs)
    seen, counts = state.rows_for(seqs, used, torch.from_numpy)
    want_seen, want_counts = _dense(seqs, used)
    assert torch.equal(seen, want_seen) and torch.equal(counts, want_counts)


def test_rows_follow_any_history_of_steps():
    rng = np.random.default_rng(0)
    state = PenaltyState(V, torch.device("cpu"))

    def new(n_prompt, n_out=0):
        ids = rng.integers(0, V, n_prompt + n_out).tolist()
        return Sequence(ids, PEN, num_prompt_tokens=n_prompt)

    seqs = [new(int(rng.integers(1, 9))) for _ in range(5)]
    for step in range(60):
        for s in seqs:
            s.token_ids.append(int(rng.integers(0, V)))
        if step % 7 == 3:  # a sequence finishes (or is aborted), another arrives
            seqs.pop(int(rng.integers(0, len(seqs))))
            seqs.append(new(int(rng.integers(1, 30)), int(rng.integers(0, 4))))
        if step % 11 == 5:  # PD hand-over: the same tokens arrive as a new object
            i = int(rng.integers(0, len(seqs)))
            old = seqs[i]
            seqs[i] = Sequence(old.token_ids, PEN, num_prompt_tokens=old.num_prompt_tokens)
        if step % 13 == 6:  # the last tokens change (a dropped token, a new one in its place)
            s = seqs[0]
            del s.token_ids[-2:]
            s.token_ids += rng.integers(0, V, 2).tolist()
        if step % 5 == 1:  # not every sequence runs in every step (preempted, waiting), and the order changes
            batch = [s for j, s in enumerate(seqs) if j != step % len(seqs)][::-1]
        else:
            batch = seqs
        used = [bool((j + step) % 4) for j in range(len(batch))] if step % 9 == 0 else None
        _check(state, batch, used)
    assert state.num_rows <= 2 * (len(seqs) + 1) + 9  # rows are reclaimed, not leaked
    assert state.rebuilds < 60  # and most steps are incremental


def test_steady_batch_reads_a_view_of_consecutive_rows():
    state = PenaltyState(V, torch.device("cpu"))
    seqs = [Sequence([1, 2, 3], PEN) for _ in range(4)]
    _check(state, seqs)
    for s in seqs:
        s.token_ids.append(7)
    seen, counts = state.rows_for(seqs, [True] * 4, torch.from_numpy)
    assert seen.data_ptr() == state.seen[1].data_ptr()  # no copy
    assert counts[:, 7].tolist() == [1.0] * 4 and state.rebuilds == 4


def test_steady_steps_take_the_pending_tokens_on_the_device(monkeypatch):
    """The async decode loop's steady step (the same batch, each sequence one placeholder longer, sampled by the
    pending step in any row order) takes the fast path, and its rows equal those built from the resolved tokens;
    a step that is not steady (a sequence two tokens longer) falls back and is right too."""
    fast = []
    advance = penalties._Steady.advance
    monkeypatch.setattr(penalties._Steady, "advance", lambda *a: fast.append(advance(*a)) or fast[-1])
    rng = np.random.default_rng(1)
    state = PenaltyState(V, torch.device("cpu"))
    seqs = [Sequence(rng.integers(0, V, 5).tolist(), PEN) for _ in range(4)]
    _check(state, seqs)
    for step in range(12):
        order = rng.permutation(4) if step % 3 == 2 else np.arange(4)  # the pending step's rows
        tokens = torch.from_numpy(rng.integers(0, V, 4))  # what it sampled, in its row order
        index = {seqs[j].seq_id: i for i, j in enumerate(order)}
        for s in seqs:
            s.token_ids.append(PLACEHOLDER)
        if step == 7:
            seqs[1].token_ids[-1:] = [3, PLACEHOLDER]
        seen, counts = state.rows_for(seqs, [True] * 4, torch.from_numpy, (tokens, index))
        for s in seqs:  # the step resolves
            s.token_ids[-1] = int(tokens[index[s.seq_id]])
        want_seen, want_counts = _dense(seqs, [True] * 4)
        assert torch.equal(seen, want_seen) and torch.equal(counts, want_counts), step
    taken = [out is not None for out in fast]
    assert taken == [True] * 7 + [False] + [True] * 4 and state.rebuilds == 4


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_model):
    return make_tiny_model("llama", seed=3)


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_preemption_keeps_penalised_outputs(tiny_dir):
    """A long run whose sequences get preempted (recompute) gives the same penalised outputs as one without."""
    prompts = random_prompts(10, 5, 40, seed=21)
    params = [SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, repetition_penalty=1.3,
                             frequency_penalty=0.6, presence_penalty=0.4, logit_bias={7: 0.5}),
              SamplingParams(temperature=1.0, seed=5, max_tokens=48, ignore_eos=True, repetition_penalty=1.2,
                             frequency_penalty=0.3),
              SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)] * 4
    params = params[:len(prompts)]
    ample = _ids(LLM(tiny_dir, kvcache_block_size=4).generate(prompts, params, use_tqdm=False))
    plain = _ids(LLM(tiny_dir, kvcache_block_size=4).generate(
        prompts, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), use_tqdm=False))
    assert ample[0] != plain[0]  # the penalties change this model's output: the comparison means something
    tight = LLM(tiny_dir, kvcache_block_size=4, num_kv_blocks=26, max_model_len=96)
    assert _ids(tight.generate(prompts, params, use_tqdm=False)) == ample
    assert tight.stats()["num_preemptions"] > 0


def test_abort_mid_run_leaves_the_others_exact(tiny_dir):
    prompts = random_prompts(4, 10, 30, seed=23)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3,
                            frequency_penalty=0.5)
    llm = LLM(tiny_dir, kvcache_block_size=8)
    alone = _ids(llm.generate(prompts[1:], params, use_tqdm=False))
    engine = llm.engine
    reqs = [engine.add_request(p, params) for p in prompts]
    for _ in range(5):
        engine.step()
    assert engine.abort(reqs[0].request_id)
    while engine.has_unfinished_requests():
        engine.step()
    assert [engine.output_of(r).outputs[0].token_ids for r in reqs[1:]] == alone
