"""M2 on CPU: the staged, micro-batched decode forward computes exactly the plain forward (fp32)."""

import pytest
import torch

from splitserve import LLM
from splitserve.config import EngineConfig
from splitserve.engine.scheduler import ScheduledBatch
from splitserve.engine.sequence import Sequence
from splitserve.layers.attention import AttentionMetadata
from splitserve.pipeline import green
from splitserve.pipeline.pingpong import microbatch_bounds, pipelined_forward
from splitserve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def runner(make_tiny_model):
    llm = LLM(make_tiny_model("qwen3", seed=5), device="cpu", num_kv_blocks=512)
    runner = llm.engine.runner
    torch.manual_seed(0)
    runner.kv_cache.normal_()  # a cache full of earlier tokens' K/V
    return runner


def _decode_inputs(runner, batch_size: int, seed: int):
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
    host = runner.prepare(ScheduledBatch(seqs, [1] * batch_size))
    t = {k: torch.from_numpy(v) for k, v in host.items()}
    meta = AttentionMetadata(slot_mapping=t["slot_mapping"], query_start_loc=t["query_start_loc"],
                             seq_lens=t["seq_lens"], block_tables=t["block_tables"], max_query_len=1,
                             max_seq_len=int(host["seq_lens"].max()),
                             query_start_loc_cpu=host["query_start_loc"].tolist(),
                             seq_lens_cpu=host["seq_lens"].tolist())
    return t["input_ids"], t["positions"], meta


# Micro-batches of at least 12 rows: below that this CPU's BLAS picks GEMM kernels by row count (M = 1,
# 2, 3, 5 ... give other roundings than the same rows inside a larger GEMM), which would be the BLAS
# differing, not the stage split.
@pytest.mark.parametrize("batch_size,num_microbatches", [(25, 2), (32, 2), (39, 3), (48, 4)])
def test_pipelined_forward_equals_plain_exactly(runner, batch_size, num_microbatches):
    input_ids, positions, meta = _decode_inputs(runner, batch_size, seed=batch_size)
    with torch.no_grad():
        plain = runner.model(input_ids, positions, meta)
        piped = pipelined_forward(runner.model, input_ids, positions, meta, num_microbatches)
    assert piped.dtype == torch.float32
    assert torch.equal(piped, plain)
    assert torch.equal(runner.model.compute_logits(piped), runner.model.compute_logits(plain))


def test_pipelined_forward_detects_a_wrong_stage_order(runner):
    """The equality above can fail: running every layer's attention before any FFN (the original system's
    bug) gives other numbers."""
    input_ids, positions, meta = _decode_inputs(runner, 25, seed=1)
    model = runner.model
    with torch.no_grad():
        plain = model(input_ids, positions, meta)
        hidden, residual = model.embed_tokens(input_ids), None
        for layer in model.layers:
            hidden, residual = layer.attention_stage(positions, hidden, residual, meta)
        for layer in model.layers:
            hidden, residual = layer.ffn_stage(hidden, residual)
        wrong, _ = model.norm(hidden, residual)
    assert not torch.allclose(wrong, plain, atol=1e-3)


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


def test_pipeline_flags_are_validated():
    with pytest.raises(ValueError, match="decode_attention_sm must be a multiple of 8"):
        EngineConfig(enable_decode_pipeline=True, decode_attention_sm=60)
    with pytest.raises(ValueError, match="decode_ffn_sm must be at least 8"):
        EngineConfig(enable_decode_pipeline=True, decode_ffn_sm=0)
    with pytest.raises(ValueError, match="need enable_decode_pipeline"):
        EngineConfig(decode_attention_sm=64)
    with pytest.raises(ValueError, match="above the 132 SMs"):
        green.check_split(72, 64, total_sms=132)
    with pytest.raises(ValueError, match="would leave SMs idle"):
        green.check_split(32, 48, total_sms=132)
    assert green.check_split(64, 64, total_sms=132) == (64, None)  # 64 is the rest (68) rounded to 8
    assert green.check_split(None, None, total_sms=132) == (None, None)
    assert green.check_split(48, None, total_sms=132) == (48, None)  # the FFN part gets the rest
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
