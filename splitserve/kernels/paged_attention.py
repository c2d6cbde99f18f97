"""Paged attention over the KV cache for decode and (chunked, prefix-cached) prefill in one kernel.

One program handles BLOCK_Q queries of one sequence for one KV head and *all* query heads of that
head's GQA group, so each K/V tile is loaded once per group. Keys are gathered through the block table
token by token, so the tile width (BLOCK_N) is independent of the cache's block size. Online softmax
in fp32, causal with an offset: query i of a sequence with L cached tokens and q new ones sits at
position L - q + i and sees keys 0..L - q + i.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr, scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
    KV_BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
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
    for start in range(0, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_valid = n < kv_end
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
    tl.store(out_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int,
                    max_seq_len: int, scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; caches: [num_blocks, block_size, Hkv, D]; returns [T, Hq, D]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    if max_query_len == 1:
        block_q, block_m = 1, max(16, triton.next_power_of_2(group))
    else:
        block_m = max(64, triton.next_power_of_2(group))
        block_q = block_m // group
    grid = (seq_lens.shape[0], triton.cdiv(max_query_len, block_q), num_kv_heads)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        KV_BLOCK_SIZE=k_cache.shape[1], GROUP=group, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=64,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
