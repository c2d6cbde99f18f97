"""Paged attention over the KV cache for decode and (chunked, prefix-cached) prefill in one kernel.

One program handles BLOCK_Q queries of one sequence for one KV head and *all* query heads of that
head's GQA group, so each K/V tile is loaded once per group. When a tile lies inside one KV block
(BLOCK_N divides the block size), its block id is one scalar load and the tile is BLOCK_N rows at a fixed
stride; otherwise keys are gathered through the block table token by token, so the tile width is
independent of the cache's block size.

Decode walks the context in 16-key tiles, with one warp per program and six tiles in flight (Triton
pipelines the loads through shared memory). KV heads vary fastest in the grid. Measured on H200
(`scripts/probe_decode_attention.py`, Qwen3-8B heads, batch 512, context 512):
- all SMs: 4.45 TB/s, against 4.33 for 64-key tiles and four warps;
- a 64-SM green partition, where the decode pipeline runs attention: 4.06 TB/s against 2.78.
With 1,024 programs or more (batch 128 and up at 8 KV heads) decode uses 64-key tiles on two warps instead, which
read faster there (`LARGE_DECODE_LAUNCH`; 4.41 against 3.75 TB/s at batch 256, context 2048).

Online softmax in fp32, causal with an offset: query i of a sequence with L cached tokens and q new
ones sits at position L - q + i and sees keys 0..L - q + i.

Decode with few (sequence, KV head) pairs would leave most SMs idle while each program walks a long
context: there the context is split over NUM_SPLITS programs (flash-decoding) that write partial results
with their log-sum-exp, and a small kernel merges them. With one split (the split count comes from the
longest context, under a CUDA graph the capture-time bound: contexts up to SPLIT_FROM_KEYS) the kernel writes
the output itself and no merge is launched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# The block-table width changes with every prefill batch: specialised on it (== 1, % 16 == 0), Triton would
# compile a new variant mid-serving the first time a width hits one of those (a 0.6-1.2 s step, seen at
# the same moment of the PD-multiplex stall probe on each fresh machine).
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr, block_tables_ptr, query_start_ptr,
    seq_lens_ptr, scale, num_heads,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
    KV_BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NUM_SPLITS: tl.constexpr, TILE_IN_ONE_BLOCK: tl.constexpr,
):
    # KV heads vary fastest: the programs running side by side read whole token rows of the same blocks
    kv_head = tl.program_id(0)
    q_tile = tl.program_id(1) // NUM_SPLITS
    split = tl.program_id(1) % NUM_SPLITS
    seq = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    m = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + m // GROUP
    head = kv_head * GROUP + m % GROUP
    m_valid = (m < BLOCK_Q * GROUP) & (q_idx < q_len)
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    row = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    q_pos = ctx_len + q_idx

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Keys after this tile's last query are masked for every row: stop before them.
    later_queries = q_len - (q_tile + 1) * BLOCK_Q
    kv_end = seq_len - later_queries * (later_queries > 0).to(tl.int32)
    chunk = ((kv_end + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    kv_start = split * chunk
    kv_stop = tl.minimum(kv_start + chunk, kv_end)
    for start in range(kv_start, kv_stop, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_valid = n < kv_stop
        if TILE_IN_ONE_BLOCK:  # start is a multiple of BLOCK_N, so the whole tile sits in one block
            block = tl.load(block_tables_ptr + seq * stride_bt + start // KV_BLOCK_SIZE)
        else:
            block = tl.load(block_tables_ptr + seq * stride_bt + n // KV_BLOCK_SIZE, mask=n_valid, other=0)
        offs = block.to(tl.int64) * stride_kb + (n % KV_BLOCK_SIZE) * stride_ks + kv_head * stride_kh
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    else:
        part = (row * num_heads + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], out,
                 mask=m_valid[:, None] & d_valid[None, :])
        lse = tl.where(l_i > 0.0, m_i + tl.log(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=m_valid)


@triton.jit
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_heads, stride_ot, stride_oh,
                         NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    base = (row * num_heads + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + s, mask=s < NUM_SPLITS, other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - tl.where(top == float("-inf"), 0.0, top)))
    parts = tl.load(part_out_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :],
                    mask=(s < NUM_SPLITS)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int,
                    max_seq_len: int, scale: float, num_splits: int | None = None,
                    launch: dict | None = None) -> torch.Tensor:
    """q: [T, Hq, D]; caches: [num_blocks, block_size, Hkv, D]; returns [T, Hq, D].

    `num_splits` (decode only) overrides the split-K choice; under CUDA graphs `max_seq_len` is the
    longest context the graph will see, so the choice is fixed at capture. `launch` overrides BLOCK_N and
    Triton's num_warps / num_stages (scripts/probe_attention_partition.py tunes with it)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    num_seqs = seq_lens.shape[0]
    kv_block_size = k_cache.shape[1]
    if max_query_len == 1:
        block_q, block_m = 1, max(16, triton.next_power_of_2(group))
        if num_splits is None:
            num_splits = decode_splits(q.device, num_seqs * num_kv_heads, max_seq_len)
        tiles = decode_launch(num_seqs * num_kv_heads * num_splits, kv_block_size)
    else:
        block_m = max(64, triton.next_power_of_2(group))
        block_q = block_m // group
        num_splits = 1
        tiles = WIDE_LAUNCH
    tiles = {**tiles, **(launch or {})}
    part_out = part_lse = out  # unused when num_splits == 1
    if num_splits > 1:
        part_out = torch.empty(num_tokens, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=q.device)
    assert num_seqs < 65536, "grid dimension 2 holds the sequences"
    grid = (num_kv_heads, triton.cdiv(max_query_len, block_q) * num_splits, num_seqs)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, part_out, part_lse, block_tables, query_start_loc, seq_lens, scale, num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        KV_BLOCK_SIZE=kv_block_size, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_Q=block_q, BLOCK_M=block_m,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", NUM_SPLITS=num_splits,
        TILE_IN_ONE_BLOCK=kv_block_size % tiles["BLOCK_N"] == 0, **tiles,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part_out, part_lse, out, num_heads, out.stride(0), out.stride(1), NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim))
    return out


# Decode tiles: one warp, 16 keys a tile, six tiles in flight (see the module docstring). Used when a tile
# fits in a KV block; prefill, and decode on smaller blocks, use 64-key tiles with Triton's default launch.
DECODE_LAUNCH = {"BLOCK_N": 16, "num_warps": 1, "num_stages": 6}
WIDE_LAUNCH = {"BLOCK_N": 64}
# With many programs (a large batch), 64-key tiles on two warps read faster: Qwen3-8B heads on an H200 at batch
# 256 take 0.84-0.85x the time of the 16-key tiles at ctx 512-8192, at batch 128 and 512 0.90-0.99x; at batch
# 64 and below the two are within a few percent either way (scripts/probe_attention_launch.py --grid,
# docs/benchmarks/h200-2026-12-01-s10/probe-attention-launch-grid.json).
LARGE_DECODE_LAUNCH = {"BLOCK_N": 64, "num_warps": 2, "num_stages": 4}
LARGE_DECODE_PROGRAMS = 1024  # (sequence, KV head, split) programs from which it is used: batch 128 x 8 KV heads


def decode_launch(programs: int, kv_block_size: int) -> dict:
    """Decode's tiles for a grid of `programs` (sequence, KV head, split) programs."""
    if programs >= LARGE_DECODE_PROGRAMS:
        return LARGE_DECODE_LAUNCH
    return DECODE_LAUNCH if kv_block_size % DECODE_LAUNCH["BLOCK_N"] == 0 else WIDE_LAUNCH

_SM_COUNT: dict = {}


# The split count comes from the longest context: the actual one in an eager step, the capture-time bound
# (max_model_len) in a CUDA graph, whose splits then share whatever context each replay has.
SPLIT_FROM_KEYS = 256  # up to this bound, one split: the merge would cost more than it saves
SPLIT_MIN_KEYS = 64  # above it, no split shorter than this (at the bound)


def decode_splits(device: torch.device, programs: int, max_seq_len: int) -> int:
    """Enough programs to fill the GPU twice over, contexts up to SPLIT_FROM_KEYS in one piece, and no split
    shorter than SPLIT_MIN_KEYS keys (docs/PERFORMANCE.md, "Split-K's shortest chunk")."""
    if device.type != "cuda" or max_seq_len <= SPLIT_FROM_KEYS:
        return 1
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * _SM_COUNT[device], programs)
    return max(1, min(want, triton.cdiv(max_seq_len, SPLIT_MIN_KEYS), 64))
