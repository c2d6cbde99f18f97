"""PD multiplexing (issue 13) on CPU: the two-lane scheduler run sequentially against the colocated engine.

A multiplexed step is a prefill batch (prompt chunks that stop short of each prompt's last token, never
sampling) and a decode batch (every row that samples, 1 token each) over one KV cache. The outputs must be
token-identical (fp32) to the colocated engine's, whatever the mix (chunked prefill, prefix hits, preemption,
aborts, seeds, n > 1). Every launch is watched: a decode-lane row samples one token, a prefill-lane row never
samples, no sequence is in both lanes of a step, and a sequence whose prompt is computed but its last token
is in the next step's decode lane."""

from __future__ import annotations

import logging
import math

import pytest
from conftest import random_prompts, watch_core_outputs, watched_llm

from splitserve import LLM, SamplingParams
from splitserve.config import EngineConfig
from splitserve.engine.scheduler import DECODE_LANE, PREFILL_LANE


def _watch(llm: LLM) -> dict:
    core, runner = llm.engine.core, llm.engine.core.runner
    seen = {"launches": [], "lanes": set(), "both_lanes_steps": 0, "step": 0}
    watch_core_outputs(core, seen)
    step, launch, pieces = core.step, runner.launch, runner.launch_in_pieces

    def record(batch):
        rows = [(s.seq_id, n, s.num_computed_tokens + n == s.num_tokens, s.num_computed_tokens + n == s.num_tokens - 1)
                for s, n in zip(batch.seqs, batch.num_new_tokens)]
        seen["launches"].append((seen["step"], batch.lane, rows))
        seen["lanes"].add(batch.lane)
        if batch.lane == DECODE_LANE:
            assert all(n == 1 and samples for _, n, samples, _ in rows), "a decode-lane row that is not 1 sampled token"
        elif batch.lane == PREFILL_LANE:
            assert not any(samples for _, _, samples, _ in rows), "a prefill-lane row that samples"
            assert not batch.block_copies

    def spy_launch(batch, prev=None, *args, **kw):
        assert batch.lane != PREFILL_LANE, "the prefill lane is launched in pieces"
        record(batch)
        return launch(batch, prev, *args, **kw)

    def spy_pieces(batch, prev, layers):
        assert batch.lane == PREFILL_LANE
        record(batch)
        return pieces(batch, prev, layers)

    def checked_step():
        before = len(seen["launches"])
        outputs = step()
        lanes = [lane for _, lane, _ in seen["launches"][before:]]
        seen["both_lanes_steps"] += lanes == [PREFILL_LANE, DECODE_LANE]
        ids = [r[0] for _, _, rows in seen["launches"][before:] for r in rows]
        assert len(ids) == len(set(ids)), "a sequence in both lanes of one step"
        seen["step"] += 1
        return outputs

    runner.launch, runner.launch_in_pieces, core.step = spy_launch, spy_pieces, checked_step
    if core.lanes is not None:  # the split is asked for the decode batch beside the prefill: its rows, its context
        seen["split_asked"], seen["decode_beside"] = [], []
        launch_prefill, start_prefill = core._launch_prefill, core.lanes.start_prefill

        def spy_launch_prefill(batch, decode):
            rows = [len(s) - 1 for s in decode.seqs]  # a decode-lane row computes its last token only
            seen["decode_beside"].append((len(rows), sum(rows) / len(rows) if rows else 0.0))
            return launch_prefill(batch, decode)

        def spy_start_prefill(num_decode, mean_ctx, prev_tokens):
            seen["split_asked"].append((num_decode, mean_ctx))
            return start_prefill(num_decode, mean_ctx, prev_tokens)

        core._launch_prefill, core.lanes.start_prefill = spy_launch_prefill, spy_start_prefill
    return seen


def _make(tiny_dir: str, multiplex: bool, **kw) -> LLM:
    return watched_llm(tiny_dir, _watch, enable_pd_multiplex=multiplex, **{"max_num_batched_tokens": 32, **kw})


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_model):
    return make_tiny_model("qwen3", seed=5)


@pytest.fixture(scope="module")
def pair(tiny_dir):
    return _make(tiny_dir, True), _make(tiny_dir, False)  # multiplexed, colocated (async scheduling)


def _summary(outputs) -> list:
    return [[(c.token_ids, c.finish_reason,
              None if c.logprobs is None else [{t: round(lp.logprob, 4) for t, lp in e.items()} for e in c.logprobs])
             for c in o.outputs] for o in outputs]


def _same(pair, prompts, params) -> list:
    outs = [llm.generate(prompts, params, use_tqdm=False) for llm in pair]
    assert _summary(outs[0]) == _summary(outs[1])
    for llm in pair:
        assert llm.stats()["kv_used_blocks"] == 0
        assert not llm.engine.has_unfinished_requests() and llm.engine.core.pending is None is llm.engine.core.unsampled
    return outs[0]


def _check_admission(seen: dict) -> None:
    """A prefill chunk that leaves only its prompt's last token in step k: that token is a decode row in step
    k + 1 (on CPU the prefill batch is done when the next step starts), unless the sequence ended meanwhile."""
    by_step: dict[int, dict[str, set]] = {}
    for step, lane, rows in seen["launches"]:
        by_step.setdefault(step, {}).setdefault(lane, set()).update(r[0] for r in rows)
    moved = 0
    for step, lane, rows in seen["launches"]:
        if lane != PREFILL_LANE or step + 1 not in by_step:
            continue
        for seq_id, _, _, leaves_last in rows:
            nxt = by_step[step + 1]
            if leaves_last and any(seq_id in ids for ids in nxt.values()):
                assert seq_id in nxt.get(DECODE_LANE, set()), f"seq {seq_id}: prefilled, not in the next decode lane"
                moved += 1
    assert moved > 0


@pytest.mark.parametrize("kw, field", [
    (dict(enable_pd_multiplex=True, pd_decode_sm=12), "pd_decode_sm"),
    (dict(enable_pd_multiplex=True, pd_decode_sm=0), "pd_decode_sm"),
    (dict(enable_pd_multiplex=True, pd_decode_sm=16.0), "pd_decode_sm"),
    (dict(enable_pd_multiplex=True, pd_itl_target_ms=0), "pd_itl_target_ms"),
    (dict(enable_pd_multiplex=True, pd_itl_target_ms=-5.0), "pd_itl_target_ms"),
    (dict(enable_pd_multiplex=True, pd_itl_target_ms=math.inf), "pd_itl_target_ms"),
    (dict(enable_pd_multiplex=True, pd_itl_target_ms=math.nan), "pd_itl_target_ms"),
    (dict(enable_pd_multiplex=True, pd_itl_target_ms="20"), "pd_itl_target_ms"),
    (dict(pd_decode_sm=16), "enable_pd_multiplex"),
    (dict(pd_itl_target_ms=20.0), "enable_pd_multiplex"),
    (dict(enable_pd_multiplex=True, enable_two_gpu_pd=True), "enable_two_gpu_pd"),
    (dict(enable_pd_multiplex=True, enable_decode_pipeline=True), "enable_decode_pipeline"),
    (dict(enable_pd_multiplex="yes"), "enable_pd_multiplex"),
])
def test_bad_config_values(kw, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig.from_kwargs(None, **kw)
    with pytest.raises(ValueError, match=field):
        LLM(None, **kw)  # before any model is loaded


def test_good_config_values():
    cfg = EngineConfig.from_kwargs(None, enable_pd_multiplex=True, pd_decode_sm=64, pd_itl_target_ms=25,
                                   enforce_eager=True)
    assert (cfg.pd_decode_sm, cfg.pd_itl_target_ms) == (64, 25)


def test_decode_partition_candidates_reach_three_quarters_of_the_gpu():
    """PD multiplexing calibrates its own candidates: a tight decode target needs more than half the SMs, where
    the decode pipeline's memory side stops."""
    from splitserve.pipeline.pd_multiplex import candidate_decode_sm
    from splitserve.pipeline.planner import candidate_splits

    assert candidate_decode_sm(132) == [24, 32, 48, 64, 80, 96]
    assert max(candidate_decode_sm(132)) > max(candidate_splits(132))
    assert all(s % 8 == 0 and 8 <= s <= 144 - 8 for s in candidate_decode_sm(144))
    assert candidate_decode_sm(16) == [8]


def _roofline_ms(decode_sm: int | None, batch: float, ctx: float) -> float:
    """A plain-math decode step: the weights read and a per-row cost, then the KV read (batch × ctx), each at a
    bandwidth that grows with the decode SMs (None: the whole GPU alone) and is lower beside a prefill; the
    weights' GEMMs lose more on few SMs than the KV's stream, so the slowdown over the idle step changes with
    the context."""
    weights, kv = 3.5 + 0.01 * batch, 2e-3 * batch * ctx
    if decode_sm is None:
        return weights + kv
    # at context 0 the 24-SM step is 2.35× the idle one, from context 1024 on under 2×: only a corner at
    # context 0 keeps the 48-SM partition that short contexts need under the default target
    return weights / (0.3 + 0.5 * decode_sm / 96) + kv / (0.8 + 0.2 * decode_sm / 96)


def _roofline_plan():
    from splitserve.pipeline.pd_multiplex import PDPlan, partition_path

    anchors, ctxs, sms = [1, 32, 64, 128, 256], [1024, 2048, 4096], [24, 48, 64, 96]
    times = {"plain": [[_roofline_ms(None, a, c) for c in ctxs] for a in anchors]}
    times |= {partition_path(sm).name: [[_roofline_ms(sm, a, c) for c in ctxs] for a in anchors] for sm in sms}
    splits = {partition_path(sm).name: [sm, 132 - sm] for sm in sms}
    return PDPlan(anchors, ctxs, times, splits, prefill_tokens=8192), sms


@pytest.mark.parametrize("target", [9.0, 14.0, 30.0, 60.0, None, "beyond"])
def test_pd_plan_follows_the_batch_and_its_contexts(target):
    """The split for a decode batch is the fewest SMs whose step, read off the plan at that batch and mean
    context, stays within the target (default: 2× the idle step there), else the most; the same as the
    plain-math step it was measured from (the plan is bilinear, the step here too, so reading it is exact, past
    the grid's ends as well, down to the planner's floor). The partitions kept (those chosen at the grid's
    corners, the grid extended to every batch and context the engine can run) serve each of them as well as
    all the partitions do."""
    import json

    from splitserve.pipeline.pd_multiplex import PDPlan

    plan, sms = _roofline_plan()
    if target == "beyond":  # met past the grid by the most SMs only: a partition no corner inside it needs
        target = 1.01 * _roofline_ms(96, 512, 16384)
    kept = sorted(plan.grid_choices(target, 512, 16384))
    for batch in (1, 20, 64, 100, 256, 300, 512):
        for ctx in (0, 200, 1024, 2500, 4096, 6000, 16384):
            sm, got_target, met = plan.choice(batch, ctx, target)
            if ctx > 0:  # at 0 the planner's floor (a tenth of the least measured step) may read above the math
                want_target = target if target is not None else 2 * _roofline_ms(None, batch, ctx)
                fits = [sm for sm in sms if _roofline_ms(sm, batch, ctx) <= want_target]
                assert got_target == pytest.approx(want_target)
                assert (sm, met) == ((fits[0], True) if fits else (sms[-1], False)), (batch, ctx)
            among = plan.choice(batch, ctx, target, among=kept)
            assert among[2] == met and among[0] >= sm, (batch, ctx, kept)
    assert PDPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    assert len(plan.table(target).splitlines()) == 2 + len(plan.anchors) * len(plan.ctx_points)


def test_pd_plan_never_trusts_a_step_the_prefill_did_not_outlast():
    """A cell timed after its prefill ended is a lower bound: the table marks it, and no choice that reads it
    counts that partition as within the target (here the 24- and 48-SM cells at batch 256 and context 4096,
    whose times would otherwise fit), nor a smaller partition's (a larger one's timing is the shorter)."""
    plan, sms = _roofline_plan()
    assert "*" not in plan.table(1e9) and plan.choice(256, 4096, 1e9)[0] == 24
    marked_at = {("partition:24", 256, 4096), ("partition:48", 256, 4096)}
    plan.overlapped = {name: [[(name, a, c) not in marked_at for c in plan.ctx_points] for a in plan.anchors]
                       for name in plan.splits}
    marked = [line for line in plan.table(1e9).splitlines() if "*" in line]
    assert len(marked) == 2 and marked[0].startswith("256 | 4096 |") and marked[0].count("*") == 2
    assert plan.choice(256, 4096, 1e9) == (64, 1e9, True)
    assert plan.choice(200, 3000, 1e9)[0] == 64  # between anchors 128 and 256, contexts 2048 and 4096
    assert plan.choice(200, 1500, 1e9)[0] == 24  # contexts 1024 to 2048: all timed beside a prefill
    assert plan.choice(100, 4096, 1e9)[0] == 24  # anchors 64 to 128: all timed beside a prefill
    plan.overlapped["partition:24"][-1][-1], plan.overlapped["partition:96"][-1][-1] = True, False
    # 96's timing ended first there, so 24-64's longer ones are no better: none counts, and the most is taken
    assert plan.choice(256, 4096, 1e9) == (96, 1e9, False)


def test_mode_is_said_once_and_reported(tiny_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="splitserve"):
        llm = LLM(tiny_dir, enable_pd_multiplex=True, num_kv_blocks=64, kvcache_block_size=8,
                  max_num_batched_tokens=16)
        llm.generate(random_prompts(3, 5, 40, seed=9), SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    said = [r for r in caplog.records if "PD multiplexing" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "CPU" in said[0].getMessage() and "do not run concurrently" in said[0].getMessage()
    stats = llm.stats()
    mode = stats["pd_multiplex"]
    assert mode["requested"] and mode["mode"] == "sequential" and not mode["concurrent"] and "CPU" in mode["reason"]
    assert mode["prefill_launches"] > 0 and mode["decode_steps_alone"] > 0 and stats["async_scheduling"]
    assert mode["decode_done_while_prefill_ran"] == 0  # one after the other on CPU
    off = _make(tiny_dir, False).stats()["pd_multiplex"]
    assert off["mode"] == "off" and not off["requested"]


def test_mixed_batch_prefix_hits_and_seeds_match_colocated(pair):
    shared = random_prompts(1, 40, 40, seed=11)[0]  # a common prefix: prefix-cache hits across requests
    prompts = random_prompts(8, 3, 90, seed=1)  # some longer than the 32-token budget: chunked prefill
    prompts += [shared + p for p in random_prompts(4, 2, 20, seed=12)]
    params = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=2) if i % 3 == 0 else
              SamplingParams(temperature=1.0, seed=100 + i, max_tokens=6 + i, ignore_eos=True) if i % 3 == 1 else
              SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=1 + 2 * i, ignore_eos=True)
              for i in range(len(prompts))]
    hits = pair[0].stats()["prefix_cache_hit_tokens"]
    outs = _same(pair, prompts, params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]  # none lost or extra
    assert pair[0].stats()["prefix_cache_hit_tokens"] - hits >= 3 * 32
    seen = pair[0].watch
    assert seen["lanes"] == {DECODE_LANE, PREFILL_LANE} and seen["both_lanes_steps"] > 0
    assert seen["split_asked"] == seen["decode_beside"] and len(seen["split_asked"]) > 0  # the same integer sums
    assert any(n > 1 and ctx > 0 for n, ctx in seen["split_asked"])
    _check_admission(seen)
    assert pair[1].watch["lanes"] == {"mixed"}  # the colocated engine's batches mix (the spy can tell)
    # ... where decode rows and prefill rows do share a launch: what the multiplexed lanes must never do
    assert any(any(r[2] for r in rows) and not all(r[2] for r in rows) for _, _, rows in pair[1].watch["launches"])


def test_preemption(tiny_dir):
    # 14 blocks of 8 tokens for 4 sequences growing to ~50 tokens: preempted and recomputed
    pair = [_make(tiny_dir, m, num_kv_blocks=14, max_num_batched_tokens=32) for m in (True, False)]
    prompts = random_prompts(4, 10, 24, seed=5)
    params = [SamplingParams(temperature=1.0, seed=20 + i, max_tokens=28, ignore_eos=True) for i in range(4)]
    params[0] = SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)
    outs = _same(pair, prompts, params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [28] * 4
    assert pair[0].stats()["num_preemptions"] > 0


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


def test_abort_mid_run(tiny_dir):
    pair = [_make(tiny_dir, m, async_scheduling=False) for m in (True, False)]  # same step boundaries
    prompts = random_prompts(5, 5, 60, seed=4)
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=16, ignore_eos=True)
    got = [_run_with_abort(llm, prompts, params, victim=1, after=5) for llm in pair]
    assert got[0] == got[1]
    assert got[0][1][1] == "abort" and len(got[0][1][0]) == 5
    assert all(len(t) == 16 and r == "length" for i, (t, r) in enumerate(got[0]) if i != 1)
    for llm in pair:
        assert llm.stats()["kv_used_blocks"] == 0


def test_n_forks_and_eos(pair):
    prompts = random_prompts(3, 20, 70, seed=7)
    params = [SamplingParams(n=3, temperature=1.0, seed=40, max_tokens=10, ignore_eos=True),
              SamplingParams(n=2, temperature=0, max_tokens=6, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=1.0, seed=3, max_tokens=30, logit_bias={2: 6.0})]  # ends on EOS early
    _same(pair, prompts, params)


def _slow_prefill(llm: LLM, steps: int) -> dict:
    """Make each prefill batch look busy on the device for `steps` queries (a GPU prefill runs beside several
    decode steps; on CPU it is done at once), and check at every launch that no busy sequence is in it."""
    core = llm.engine.core
    queries: dict[int, int] = {}
    state = {"held": True}

    def is_done(step) -> bool:
        queries[id(step)] = queries.get(id(step), 0) + 1
        return not state["held"] or queries[id(step)] > steps

    spies = core.runner.launch, core.runner.launch_in_pieces

    def launch(batch, *args, **kw):
        assert not {s.seq_id for s in batch.seqs} & core.scheduler.busy, "a busy sequence launched again"
        return spies[0](batch, *args, **kw)

    def pieces(batch, *args, **kw):
        assert not {s.seq_id for s in batch.seqs} & core.scheduler.busy, "a busy sequence launched again"
        return spies[1](batch, *args, **kw)

    core.lanes.is_done, core.runner.launch, core.runner.launch_in_pieces = is_done, launch, pieces
    return state


@pytest.mark.parametrize("steps", [2, 5])
def test_prefill_beside_several_decode_steps(tiny_dir, steps, monkeypatch):
    """Prefill batches that stay busy for several decode steps, enqueued one layer per piece, under KV pressure
    (preemption): same tokens."""
    import splitserve.engine.core

    monkeypatch.setattr(splitserve.engine.core, "PREFILL_LAYERS_PER_PIECE", 1)
    pair = [_make(tiny_dir, m, num_kv_blocks=24, max_num_batched_tokens=24) for m in (True, False)]
    assert pair[0].engine.core.runner.num_layers > 1  # so the batch really goes in several pieces
    _slow_prefill(pair[0], steps)
    prompts = random_prompts(6, 10, 70, seed=15)
    params = [SamplingParams(temperature=1.0, seed=50 + i, max_tokens=20, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1) for i in range(6)]
    _same(pair, prompts, params)
    mode = pair[0].stats()["pd_multiplex"]
    assert mode["decode_steps_beside_prefill"] > 0 and pair[0].stats()["num_preemptions"] > 0


def test_abort_while_its_prefill_runs(tiny_dir):
    """An aborted sequence's blocks stay out of the free list while its prefill batch may still write them."""
    llm = _make(tiny_dir, True, num_kv_blocks=32, max_num_batched_tokens=64)
    state = _slow_prefill(llm, 3)
    engine, core = llm.engine, llm.engine.core
    running = engine.add_request(random_prompts(1, 8, 8, seed=1)[0], SamplingParams(temperature=0, max_tokens=12))
    for _ in range(3):
        engine.step()  # its prompt is done: it is a decode row now
    victim = engine.add_request(random_prompts(1, 50, 50, seed=2)[0], SamplingParams(temperature=0, max_tokens=4))
    engine.step()  # the victim's prefill batch is launched and stays busy
    seq = core.requests[victim.request_id]
    assert core.prefill_pending is not None and seq.seq_id in core.scheduler.busy
    blocks = list(seq.block_table)
    assert engine.abort(victim.request_id)
    assert blocks and not set(blocks) & set(core.block_manager.free), "blocks freed under a running prefill"
    state["held"] = False
    while engine.has_unfinished_requests():
        engine.step()
    assert running.finish_reason == "length" and victim.finish_reason == "abort"
    assert llm.stats()["kv_used_blocks"] == 0 and core.prefill_pending is None


def test_prefill_run_keeps_at_most_two_pieces_queued():
    """PrefillRun.feed enqueues a piece only while fewer than two are not done on the device; finish enqueues
    the rest. A fake runner's pieces: events whose done flag the test flips."""
    from splitserve.pipeline.pd_multiplex import PrefillRun
    from splitserve.worker.model_runner import LaunchedStep

    class Event:
        def __init__(self):
            self.done = False

        def query(self):
            return self.done

    events, last = [Event() for _ in range(5)], LaunchedStep(None, None, [], None, {}, [], None, [], None, False)
    enqueued = []

    def pieces():
        for e in events:
            enqueued.append(e)
            yield e
        yield last

    run = PrefillRun(None, pieces(), None)
    run.feed()
    assert enqueued == events[:2] and run.step is None
    run.feed()
    assert enqueued == events[:2]  # neither is done: nothing more
    events[0].done = True
    run.feed()
    assert enqueued == events[:3] and not run.done()
    assert run.finish() is last and enqueued == events and run.done()


def test_server_streams_with_lanes_and_stop_strings(make_tiny_model):
    """`serve --enable-pd-multiplex`: concurrent streams (a long prompt prefilled in several chunks beside the
    running decodes), one cut by a stop string, equal the colocated engine's text; the stop never leaks."""
    import concurrent.futures

    from test_server import client, running_server

    model = make_tiny_model("llama", seed=3, num_hidden_layers=2)
    prompts = ["hello there", "the quick brown fox " * 12, "one two three four five six"]
    want = LLM(model, max_num_batched_tokens=16).generate(
        prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    want_text = [o.outputs[0].text for o in want]
    stop = want_text[0][5:9]  # a stop string the first completion reaches
    with running_server(model, "--enable-pd-multiplex", "--max-num-batched-tokens", "16") as url:
        c = client(url)

        def stream(i: int) -> str:
            extra = {"stop": [stop]} if i == 0 else {}
            chunks = c.completions.create(model="tiny", prompt=prompts[i], max_tokens=24, temperature=0,
                                          stream=True, extra_body={"ignore_eos": True}, **extra)
            return "".join(ch.choices[0].text for ch in chunks)

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            got = list(pool.map(stream, range(3)))
    assert stop and got[0] == want_text[0][: want_text[0].index(stop)] and stop not in got[0]
    assert got[1:] == want_text[1:]
