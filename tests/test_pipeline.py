"""M2 on CPU: the staged, micro-batched decode forward computes exactly the plain forward (fp32).

The stages are issue 14's cut: compute (every GEMM and norm) and memory (rotary, KV write, paged attention).
"""

import dataclasses

import pytest
import torch

from splitserve import LLM
from splitserve.config import EngineConfig
from splitserve.engine.scheduler import ScheduledBatch
from splitserve.engine.sequence import Sequence
from splitserve.layers.attention import AttentionMetadata
from splitserve.models.llama import Handoff
from splitserve.pipeline import green
from splitserve.pipeline.pingpong import PingPong, microbatch_bounds
from splitserve.sampling_params import SamplingParams
from splitserve.worker.decode_graphs import PLAIN, DecodePath, pipeline_path
from splitserve.worker.inputs import prepare_inputs


@pytest.fixture(scope="module")
def runner(make_tiny_model):
    llm = LLM(make_tiny_model("qwen3", seed=5), device="cpu", num_kv_blocks=512)
    runner = llm.engine.core.runner
    torch.manual_seed(0)
    runner.kv_cache.normal_()  # a cache full of earlier tokens' K/V
    return runner


def _decode_seqs(runner, batch_size: int, seed: int) -> list[Sequence]:
    """Decode sequences with random contexts, each on its own blocks."""
    g = torch.Generator().manual_seed(seed)
    bs = runner.block_size
    seqs, next_block = [], 0
    for _ in range(batch_size):
        ctx = int(torch.randint(1, 120, (1,), generator=g))
        s = Sequence(torch.randint(3, 1000, (ctx + 1,), generator=g).tolist(), SamplingParams(max_tokens=1))
        blocks = -(-(ctx + 1) // bs)
        s.block_table = list(range(next_block, next_block + blocks))
        next_block += blocks
        s.num_computed_tokens = ctx
        seqs.append(s)
    return seqs


def _inputs(runner, seqs: list[Sequence]):
    host = prepare_inputs(ScheduledBatch(seqs, [1] * len(seqs)), runner.block_size)
    t = {k: torch.from_numpy(v) for k, v in host.items()}
    meta = AttentionMetadata(slot_mapping=t["slot_mapping"], query_start_loc=t["query_start_loc"],
                             seq_lens=t["seq_lens"], block_tables=t["block_tables"], max_query_len=1,
                             max_seq_len=int(host["seq_lens"].max()),
                             query_start_loc_cpu=host["query_start_loc"].tolist(),
                             seq_lens_cpu=host["seq_lens"].tolist())
    return t["input_ids"], t["positions"], meta


def _decode_inputs(runner, batch_size: int, seed: int):
    return _inputs(runner, _decode_seqs(runner, batch_size, seed))


# Micro-batches of at least 12 rows: below that this CPU's BLAS (MKL sgemm) picks GEMM kernels by row
# count (M = 1, 2, 3, 5, 6, 7, 9, 10, 11 round differently from the same rows inside a larger GEMM), which
# would be the BLAS differing, not the stage split. Smaller micro-batches: the next test.
@pytest.mark.parametrize("batch_size,microbatches", [
    (25, 2), (32, 2), (39, 3), (48, 4),  # odd and even, 2, 3 and 4 equal-ish parts
    (39, [25, 14]), (40, (0.7, 0.3)), (41, (0.6, 0.4)), (51, [12, 27, 12]),  # uneven: sizes, fractions
])
def test_pipelined_forward_equals_plain_exactly(runner, batch_size, microbatches):
    input_ids, positions, meta = _decode_inputs(runner, batch_size, seed=batch_size)
    assert min(b - a for a, b in microbatch_bounds(batch_size, microbatches)) >= 12
    with torch.no_grad():
        plain = runner.model(input_ids, positions, meta)
        piped = runner.model(input_ids, positions, meta, PingPong(microbatches))
    assert piped.dtype == torch.float32
    assert torch.equal(piped, plain)
    assert torch.equal(runner.model.compute_logits(piped), runner.model.compute_logits(plain))


@pytest.mark.parametrize("batch_size,microbatches", [
    (7, [5, 2]), (7, (0.7, 0.3)), (7, 2), (8, 2), (9, 3), (3, 2), (1, 2)])
def test_small_microbatches_equal_the_plain_forward_of_each_microbatch(runner, batch_size, microbatches):
    """Micro-batches below 12 rows: every row equals the plain forward of its micro-batch's sequences alone
    (inputs prepared from those sequences, not cut out of the batch's), bit for bit, and the batch is
    within fp32 rounding of the plain forward of the whole batch."""
    seqs = _decode_seqs(runner, batch_size, seed=100 + batch_size)
    input_ids, positions, meta = _inputs(runner, seqs)
    with torch.no_grad():
        piped = runner.model(input_ids, positions, meta, PingPong(microbatches))
        whole = runner.model(input_ids, positions, meta)
        each = torch.cat([runner.model(*_inputs(runner, seqs[a:b]))
                          for a, b in microbatch_bounds(batch_size, microbatches)])
    assert torch.equal(piped, each)
    torch.testing.assert_close(piped, whole, rtol=1e-5, atol=1e-5)


def test_pipelined_forward_detects_a_stale_handoff(runner):
    """The equality above can fail. On a GPU a missing event wait lets a stage read what an earlier stage
    left behind; here micro-batch 1's second attention is replaced by its first one's output, on purpose."""
    input_ids, positions, meta = _decode_inputs(runner, 25, seed=1)
    model = runner.model
    attn_out: dict = {}

    def remembered(stage):
        def run(pos, x, m):
            out = stage.run(pos, x, m)
            attn_out[pos.data_ptr()] = out.attn
            return out
        return dataclasses.replace(stage, run=run)

    def stale(stage):
        def run(pos, x, m):
            if pos.data_ptr() == positions.data_ptr():  # micro-batch 0: the real attention
                return stage.run(pos, x, m)
            return Handoff(x.residual, attn=attn_out[pos.data_ptr()])
        return dataclasses.replace(stage, run=run)

    stages = [remembered(s) if s.kind == "memory" else s for s in model.stages()]
    assert [s.name for s in stages] == ["pre0", "attend0", "post0+pre1", "attend1", "post1"]
    stages[3] = stale(stages[3])
    with torch.no_grad():
        plain = model(input_ids, positions, meta)
        hidden, residual = PingPong(2)(stages, positions, model.embed_tokens(input_ids), meta)
        wrong, _ = model.norm(hidden, residual)
        right, _ = model.norm(*PingPong(2)(model.stages(), positions, model.embed_tokens(input_ids), meta))
    assert torch.equal(right, plain)
    assert torch.equal(wrong[:13], plain[:13])  # micro-batch 0 kept its own attention
    assert not torch.allclose(wrong[13:], plain[13:], atol=1e-3)


PARTS = ("compute_pre", "memory", "compute_post")


@pytest.mark.parametrize("batch_size,microbatches,sizes", [
    (7, 2, [4, 3]), (7, 3, [3, 2, 2]), (8, 2, [4, 4]), (7, [5, 2], [5, 2]), (7, (0.7, 0.3), [5, 2]),
    (10, (0.6, 0.4), [6, 4])])
def test_stages_run_in_model_order_on_their_own_stream(runner, batch_size, microbatches, sizes):
    """A spy on every layer's three stage functions. Plain forward: each layer runs compute-pre, memory,
    compute-post (DecoderLayer.forward is made of the functions the schedule runs). Ping-pong: each
    micro-batch runs them in model order, memory work only on the memory stream and compute work only on
    the compute stream, stage by stage across micro-batches (the interleaving that lets a memory stage of
    one micro-batch overlap a compute stage of another)."""
    model = runner.model
    input_ids, positions, meta = _decode_inputs(runner, batch_size, seed=3)
    schedule = PingPong(microbatches)
    log = []

    def spy(layer: int, part: str, fn):
        def run(pos, x, m):
            row = (pos.data_ptr() - positions.data_ptr()) // positions.element_size()
            log.append((row, layer, part, schedule.slot))
            return fn(pos, x, m)
        return run

    for i, layer in enumerate(model.layers):
        for part in PARTS:  # instance attributes shadow the methods; forward and stages() both see them
            setattr(layer, part, spy(i, part, getattr(layer, part)))
    try:
        with torch.no_grad():
            plain = model(input_ids, positions, meta)
            plain_log, log[:] = list(log), []
            piped = model(input_ids, positions, meta, schedule)
    finally:
        for layer in model.layers:
            for part in PARTS:
                delattr(layer, part)
    model_order = [(i, part) for i in range(len(model.layers)) for part in PARTS]
    assert plain_log == [(0, i, part, None) for i, part in model_order]
    starts = [sum(sizes[:m]) for m in range(len(sizes))]
    assert sorted({row for row, *_ in log}) == starts
    for start in starts:
        assert [(i, part) for row, i, part, _ in log if row == start] == model_order
    for _, _, part, slot in log:
        assert slot == ("memory" if part == "memory" else "compute")
    # stage by stage: pre0 | attend0 | post0 + pre1 | attend1 | post1, each for every micro-batch in turn
    groups = [[(0, "compute_pre")]]
    for i in range(len(model.layers)):
        groups.append([(i, "memory")])
        groups.append([(i, "compute_post")] + ([(i + 1, "compute_pre")] if i + 1 < len(model.layers) else []))
    assert [(row, i, part) for row, i, part, _ in log] == [
        (start, i, part) for group in groups for start in starts for i, part in group]
    assert schedule.slot is None and piped.shape == plain.shape


def test_microbatch_bounds():
    assert microbatch_bounds(7, 2) == [(0, 4), (4, 7)]
    assert microbatch_bounds(8, 2) == [(0, 4), (4, 8)]
    assert microbatch_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert microbatch_bounds(1, 2) == [(0, 1)]
    for b in range(1, 40):
        for n in (2, 3, 4):
            parts = microbatch_bounds(b, n)
            assert parts[0][0] == 0 and parts[-1][1] == b
            assert all(p[1] == q[0] for p, q in zip(parts, parts[1:]))
            sizes = [e - s for s, e in parts]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    # explicit sizes
    assert microbatch_bounds(7, [5, 2]) == [(0, 5), (5, 7)]
    assert microbatch_bounds(7, [0, 7]) == [(0, 7)]  # an empty micro-batch is left out
    with pytest.raises(ValueError, match="add up"):
        microbatch_bounds(7, [5, 3])
    # fractions: cuts at the nearest row (halves round up), every row covered once
    assert microbatch_bounds(7, (0.7, 0.3)) == [(0, 5), (5, 7)]
    assert microbatch_bounds(1024, (0.6, 0.4)) == [(0, 614), (614, 1024)]
    assert microbatch_bounds(5, (0.5, 0.5)) == [(0, 3), (3, 5)] == microbatch_bounds(5, 2)
    assert microbatch_bounds(10, (0.2, 0.3, 0.5)) == [(0, 2), (2, 5), (5, 10)]
    assert microbatch_bounds(1, (0.7, 0.3)) == [(0, 1)]
    assert microbatch_bounds(2, (0.9, 0.1)) == [(0, 2)]
    for b in range(1, 60):
        for f in (0.5, 0.6, 0.7, 0.75):
            parts = microbatch_bounds(b, (f, 1 - f))
            assert parts[0][0] == 0 and parts[-1][1] == b and all(e > s for s, e in parts)
            assert abs((parts[0][1] - parts[0][0]) - f * b) <= 0.5 or len(parts) == 1
    for bad in [(0.7, 0.4), (1.2, -0.2), (0.0, 1.0)]:
        with pytest.raises(ValueError, match="fractions"):
            microbatch_bounds(10, bad)


def test_decode_path_names_round_trip():
    for name in ["eager", "plain", "pipeline:48", "pipeline:48:0.6", "partition:64"]:
        assert DecodePath.parse(name).name == name
    assert DecodePath.parse("pipeline:48:0.5") == pipeline_path(48) and pipeline_path(48).name == "pipeline:48"
    assert pipeline_path(48, 84, 0.7).microbatches == (0.7, pytest.approx(0.3))
    assert pipeline_path(48, 84) == pipeline_path(48) != pipeline_path(48, 84, 0.6)  # compute_sm: implied
    for bad in ["pipeline", "pipeline:x", "pipeline:48:1.5", "pipeline:48:a", "plain:48", "partition:64:0.6",
                "attention:48"]:
        with pytest.raises(ValueError, match="not a decode path"):
            DecodePath.parse(bad)


def test_pipeline_flags_are_validated():
    with pytest.raises(ValueError, match="decode_memory_sm must be a multiple of 8"):
        EngineConfig(enable_decode_pipeline=True, decode_memory_sm=60)
    with pytest.raises(ValueError, match="decode_compute_sm must be at least 8"):
        EngineConfig(enable_decode_pipeline=True, decode_compute_sm=0)
    with pytest.raises(ValueError, match="need enable_decode_pipeline"):
        EngineConfig(decode_memory_sm=64)
    with pytest.raises(TypeError, match="unknown engine argument"):  # the attention/FFN split is gone
        EngineConfig.from_kwargs(enable_decode_pipeline=True, decode_attention_sm=64)
    with pytest.raises(ValueError, match="above the 132 SMs"):
        green.check_split(72, 64, total_sms=132)
    with pytest.raises(ValueError, match="would leave SMs idle"):
        green.check_split(32, 48, total_sms=132)
    assert green.check_split(64, 64, total_sms=132) == (64, None)  # 64 is the rest (68) rounded to 8
    assert green.check_split(None, None, total_sms=132) == (None, None)
    assert green.check_split(48, None, total_sms=132) == (48, None)  # the compute part gets the rest
    assert green.check_split(None, 64, total_sms=132) == (64, None)


def test_capability_reports_a_reason_on_cpu():
    ok, reason = green.capability(torch.device("cpu"))
    assert not ok and "CPU" in reason


def test_requested_pipeline_falls_back_with_one_warning(make_tiny_model, caplog):
    with caplog.at_level("WARNING", logger="splitserve"):
        llm = LLM(make_tiny_model("qwen3", seed=5), device="cpu", enable_decode_pipeline=True)
    warnings = [r for r in caplog.records if "decode pipeline" in r.getMessage()]
    assert len(warnings) == 1
    assert "CPU" in warnings[0].getMessage() and "eager" in warnings[0].getMessage()
    stats = llm.stats()
    assert stats["decode_path"] == "eager" and "CPU" in stats["decode_pipeline"]["reason"]
    assert stats["decode_pipeline"]["requested"] is True and stats["decode_pipeline"]["active"] is False


# ---- planner (M2 fix 3, M3) on synthetic timings ----

def _synthetic_ms(path: str, batch: int, ctx: int) -> float:
    """A toy cost model with the real shape: plain runs the compute (GEMM) and memory (attention) stages in
    series; a split overlaps them at a fixed extra cost (each micro-batch re-reads the weights), the GEMMs
    slow down with fewer SMs, and the memory-bound attention saturates at 70% of the SMs."""
    compute, memory = 0.008 * batch, 0.00001 * batch * ctx
    if path == "plain":
        return 0.2 + compute + memory
    share = int(path.split(":")[1]) / 132
    return 0.5 + max(compute / (1 - share), memory / min(1.0, share / 0.7))


PATHS = ["plain", "pipeline:32", "pipeline:64", "pipeline:96"]


def _plan(anchors=(32, 64, 128, 256), ctx_points=(256, 1024, 4096)):
    from splitserve.pipeline.planner import Plan

    times = {p: [[_synthetic_ms(p, a, c) for c in ctx_points] for a in anchors] for p in PATHS}
    return Plan(list(anchors), list(ctx_points), times)


def test_candidate_splits_and_anchor_buckets():
    from splitserve.pipeline.planner import anchor_buckets, candidate_splits

    assert candidate_splits(132) == [24, 32, 40, 48, 64]
    assert candidate_splits(16) == [8]
    buckets = [1, 2, 4, 8] + list(range(16, 1024, 16)) + [1024]
    assert anchor_buckets(buckets) == [32, 64, 128, 256, 384, 512, 640, 768, 896, 1024]
    assert anchor_buckets([1, 2, 4, 8, 16, 32, 48, 64, 80]) == [32, 64, 80]


def test_planner_picks_the_fastest_path_at_every_calibrated_point():
    from splitserve.pipeline.planner import DecodePlanner

    plan = _plan()
    for anchor in plan.anchors:
        for ctx in plan.ctx_points:
            truth = min(PATHS, key=lambda p: _synthetic_ms(p, anchor, ctx))
            assert DecodePlanner(plan).choose(anchor, anchor, ctx) == (DecodePath.parse(truth), anchor)
    # the toy model makes each kind of answer appear: plain at small batch, different splits at large
    answers = {DecodePlanner(plan).choose(a, a, c)[0].name for a in plan.anchors for c in plan.ctx_points}
    assert "plain" in answers and len(answers - {"plain"}) >= 2


def test_planner_interpolates_between_points_and_pads_to_an_anchor():
    from splitserve.pipeline.planner import DecodePlanner

    plan = _plan()
    # context between calibrated points: linear in context, which this toy model is for plain
    assert plan.estimate("plain", 128, 512) == pytest.approx(_synthetic_ms("plain", 128, 512))
    # a plain bucket between anchors is interpolated in batch (the toy model is linear in batch too)
    assert plan.estimate("plain", 208, 1024) == pytest.approx(_synthetic_ms("plain", 208, 1024))
    # 200 sequences: plain replays its 208 bucket; a pipelined path replays the 256 anchor (padded)
    options = DecodePlanner(plan).candidates(200, 208, 1024)
    assert options[PLAIN][1] == 208 and all(b == 256 for p, (_, b) in options.items() if p != PLAIN)
    assert options[DecodePath.parse("pipeline:64")][0] == pytest.approx(plan.estimate("pipeline:64", 256, 1024))
    # below the smallest anchor there is no pipelined graph: plain, with no estimate needed
    assert DecodePlanner(plan).candidates(12, 16, 1024) == {PLAIN: (0.0, 16)}


def test_planner_rebalances_as_context_grows_with_hysteresis():
    """M3: a batch whose context grows moves from one split to another as attention's share grows; with
    hysteresis it switches once per boundary even when the context wobbles around the crossover."""
    from splitserve.pipeline.planner import DecodePlanner

    plan = _plan()
    planner = DecodePlanner(plan, hysteresis=0.03)
    chosen = [planner.choose(256, 256, ctx)[0].name for ctx in range(256, 4097, 64)]
    best_at = {ctx: min(PATHS, key=lambda p: plan.estimate(p, 256, ctx)) for ctx in range(256, 4097, 64)}
    best = list(best_at.values())
    assert len({p for p in chosen if p != "plain"}) >= 2  # two different splits over the run
    assert planner.num_switches == sum(a != b for a, b in zip(chosen, chosen[1:]))
    assert planner.num_switches <= sum(a != b for a, b in zip(best, best[1:]))  # never more than the optimum
    assert chosen[0] == best_at[256] and chosen[-1] == best_at[4096]
    # within the hysteresis margin the current path stays; beyond it the planner moves
    for i, ctx in enumerate(range(256, 4097, 64)):
        est = {p: plan.estimate(p, 256, ctx) for p in PATHS}
        assert est[chosen[i]] <= 1.03 * min(est.values()) + 1e-9
    wobble = DecodePlanner(plan, hysteresis=0.03)
    crossover = next(ctx for ctx in range(256, 4097, 8) if best_at.get(ctx // 64 * 64) != chosen[0])
    path = [wobble.choose(256, 256, ctx)[0].name for ctx in [256] + [crossover - 8, crossover + 8] * 10]
    assert wobble.num_switches <= 2, path
    without = DecodePlanner(plan, hysteresis=0.0)
    for ctx in [256] + [crossover - 64, crossover + 64] * 10:
        without.choose(256, 256, ctx)
    assert without.num_switches > wobble.num_switches  # the margin is what stops the flapping


def test_planner_keeps_only_graphs_it_can_choose_and_round_trips_as_json():
    import json

    from splitserve.pipeline.planner import DecodePlanner, Plan

    plan = _plan()
    planner = DecodePlanner(plan)
    keep = planner.used_graphs()
    chosen = {DecodePlanner(plan).choose(a, a, c) for a in plan.anchors for c in plan.ctx_points}
    assert {(p, b) for p, b in chosen if p != PLAIN} <= keep
    assert all(p != PLAIN for p, _ in keep) and len(keep) < 3 * len(plan.anchors)
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan
    with pytest.raises(ValueError, match="version"):
        Plan.from_json({**plan.to_json(), "version": 0})
    assert "pipeline:" in plan.table() and "plain" in plan.table()


def test_calibration_stops_capturing_where_the_pipeline_keeps_losing():
    """Largest anchor first; after two anchors where every split is >10% slower than plain everywhere, no
    more pipelined graphs are captured (their memory is not spent) and the plan marks them missing."""
    from splitserve.pipeline.planner import DecodePlanner, calibrate

    class FakeGraphs:  # what calibrate uses of worker.decode_graphs.DecodeGraphs
        profiler = None

        def __init__(self):
            self.pipelined, self.captured = {}, []

        def capture_pipelined(self, path, bucket, schedule):
            self.captured.append((path, bucket))
            self.pipelined[(path, bucket)] = object()

        def time(self, path, bucket, ctx, iters):
            return _synthetic_ms(path.name, bucket, ctx) * (3.0 if path != PLAIN and bucket <= 64 else 1.0)

    class Part:
        memory_stream = compute_stream = None

        def __init__(self, sm):
            self.memory_sm, self.compute_sm = sm, 132 - sm

    graphs = FakeGraphs()
    plan = calibrate(graphs, {DecodePath.parse(p): Part(int(p.split(":")[1])) for p in PATHS[1:]},
                     [16, 32, 64, 128, 256], [256, 1024, 4096])
    assert {b for _, b in graphs.captured} == {256, 128, 64, 32}  # 64 and 32 lose: 16 is skipped
    assert not plan.has("pipeline:64", 16) and plan.has("plain", 16) and plan.has("pipeline:64", 32)
    assert DecodePlanner(plan).choose(16, 16, 1024)[0] == PLAIN
    assert plan.anchors == [16, 32, 64, 128, 256]


def test_plan_tells_uneven_microbatch_variants_apart():
    """Variants of one split that cut the batch differently are separate paths: the plan keeps their split
    sizes and micro-batch fractions through JSON, and the planner hands back the one that measured fastest."""
    import json

    from splitserve.pipeline.planner import DecodePlanner, Plan

    times = {"plain": [[2.0]], "pipeline:48": [[1.5]], "pipeline:48:0.6": [[1.2]], "pipeline:48:0.7": [[1.4]]}
    splits = {name: [48, 84] for name in times if name != "plain"}
    plan = Plan.from_json(json.loads(json.dumps(Plan([256], [1024], times, splits).to_json())))
    path, bucket = DecodePlanner(plan).choose(256, 256, 1024)
    assert (path, bucket) == (pipeline_path(48, 84, 0.6), 256)
    assert path.compute_sm == 84 and path.microbatches == (0.6, pytest.approx(0.4))
    assert len(DecodePlanner(plan).paths) == 4
