"""Host-side step inputs: a scheduled batch -> numpy arrays, and the one builder of fake batches.

Preparation is vectorised with numpy: its cost grows with the number of sequences only through one list
concatenation, not through per-token Python loops.
"""

from __future__ import annotations

import numpy as np

from splitserve.engine.scheduler import ScheduledBatch
from splitserve.engine.sequence import Sequence
from splitserve.sampling_params import SamplingParams


def prepare_inputs(batch: ScheduledBatch, block_size: int) -> dict[str, np.ndarray]:
    seqs, qlens = batch.seqs, np.asarray(batch.num_new_tokens, dtype=np.int64)
    starts = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=len(seqs))
    cu_q = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(qlens, out=cu_q[1:])
    num_tokens = int(cu_q[-1])
    token_ids = np.fromiter(
        (t for s, st, n in zip(seqs, starts, qlens) for t in s.token_ids[st:st + n]), dtype=np.int64,
        count=num_tokens)
    row = np.repeat(np.arange(len(seqs)), qlens)
    positions = np.arange(num_tokens, dtype=np.int64) - cu_q[:-1][row] + starts[row]
    width = max(len(s.block_table) for s in seqs)
    tables = np.zeros((len(seqs), width), dtype=np.int32)
    for i, s in enumerate(seqs):
        tables[i, : len(s.block_table)] = s.block_table
    slots = tables[row, positions // block_size].astype(np.int64) * block_size + positions % block_size
    samples = np.asarray(batch.samples(), dtype=bool)
    return {"input_ids": token_ids, "positions": positions, "slot_mapping": slots,
            "query_start_loc": cu_q.astype(np.int32), "seq_lens": (starts + qlens).astype(np.int32),
            "block_tables": tables, "logits_indices": (cu_q[1:] - 1)[samples], "samples": samples}


_FAKE_PARAMS = SamplingParams(temperature=0.0, max_tokens=1)


def fake_batch(num_seqs: int, ctx: int, block_size: int, num_kv_blocks: int, num_new_tokens: int = 1,
               token_id: int = 1) -> ScheduledBatch:
    """`num_seqs` sequences with `ctx` tokens in the cache and `num_new_tokens` to compute (1: a decode
    step), for start-up profiling, graph timing and benchmarks. Each sequence's blocks follow the previous
    one's and wrap around the cache, so the KV read is as large as a real batch's and does not sit in L2
    (the KV content is whatever the cache holds). A step over it writes into the cache: run one only while
    no request holds blocks."""
    blocks = -(-(ctx + num_new_tokens) // block_size)
    seqs = []
    for i in range(num_seqs):
        seq = Sequence([token_id] * (ctx + num_new_tokens), _FAKE_PARAMS)
        seq.block_table = [(i * blocks + j) % num_kv_blocks for j in range(blocks)]
        seq.num_computed_tokens = ctx
        seqs.append(seq)
    return ScheduledBatch(seqs, [num_new_tokens] * num_seqs)
