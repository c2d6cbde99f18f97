"""Fused elementwise kernels for the CUDA path: RMSNorm (+residual add), rotary, SiLU-and-mul.

Each reproduces the torch reference in splitserve.layers bit for bit in bf16/fp16 — same roundings in
the same places (products of two 16-bit floats are exact in fp32, so computing in fp32 and rounding once
where torch rounds gives torch's result) — so the CUDA path stays comparable to HF transformers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, eps,
                     rows_per_group, stride_group, stride_row, N: tl.constexpr, BLOCK: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr):
    # A row is x[group, row_in_group, :] so that q/k heads inside a fused QKV output are normalised in place.
    r = tl.program_id(0)
    src = (r // rows_per_group).to(tl.int64) * stride_group + (r % rows_per_group) * stride_row
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + src + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + r.to(tl.int64) * N + cols, mask=mask,
                                        other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + r.to(tl.int64) * N + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    normed = (xf * (1.0 / tl.sqrt(var + eps))).to(x.dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    y = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + src + cols, y, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None):
    """x: [..., N] with a contiguous last dim. With `residual`: returns (norm(x + residual), x + residual)."""
    n = x.shape[-1]
    if x.dim() == 3:  # [T, H, D] heads, possibly a strided view into a fused projection
        groups, rows_per_group = x.shape[0], x.shape[1]
        stride_group, stride_row = x.stride(0), x.stride(1)
    else:
        x = x.reshape(-1, n)
        groups, rows_per_group, stride_group, stride_row = x.shape[0], 1, x.stride(0), 0
    assert x.stride(-1) == 1
    out = torch.empty_like(x) if out is None else out
    assert out.stride() == x.stride()
    residual_out = torch.empty_like(residual) if residual is not None else None
    _rms_norm_kernel[(groups * rows_per_group,)](
        x, residual if residual is not None else x, weight, out,
        residual_out if residual_out is not None else x, eps, rows_per_group, stride_group, stride_row,
        N=n, BLOCK=triton.next_power_of_2(n), HAS_RESIDUAL=residual is not None, num_warps=4 if n <= 2048 else 8)
    return out if residual is None else (out, residual_out)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, cos_sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    imask = i < HALF
    # the table is [max_pos, 2, 2*HALF] fp32; HF rounds cos/sin to the model dtype first
    cos = tl.load(cos_sin_ptr + pos * 4 * HALF + i, mask=imask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * 4 * HALF + 2 * HALF + i, mask=imask, other=0.0)
    h = tl.arange(0, BLOCK_H)[:, None]
    for which in tl.static_range(2):
        if which == 0:
            base, sh, nh = q_ptr + t.to(tl.int64) * stride_qt, stride_qh, NUM_Q_HEADS
        else:
            base, sh, nh = k_ptr + t.to(tl.int64) * stride_kt, stride_kh, NUM_K_HEADS
        mask = (h < nh) & imask[None, :]
        p1 = base + h * sh + i[None, :]
        x1 = tl.load(p1, mask=mask, other=0.0)
        x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
        c = cos.to(x1.dtype).to(tl.float32)[None, :]
        s = sin.to(x1.dtype).to(tl.float32)[None, :]
        a1 = x1.to(tl.float32)
        a2 = x2.to(tl.float32)
        # out1 = x1*cos - x2*sin ; out2 = x2*cos + x1*sin, each product rounded as torch does
        o1 = ((a1 * c).to(x1.dtype).to(tl.float32) + (-a2 * s).to(x1.dtype).to(tl.float32)).to(x1.dtype)
        o2 = ((a2 * c).to(x1.dtype).to(tl.float32) + (a1 * s).to(x1.dtype).to(tl.float32)).to(x1.dtype)
        tl.store(p1, o1, mask=mask)
        tl.store(p1 + HALF, o2, mask=mask)


def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """In place on q [T, Hq, D] and k [T, Hk, D] (strided views allowed, last dim contiguous)."""
    num_tokens, hq, d = q.shape
    hk = k.shape[1]
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), NUM_Q_HEADS=hq,
        NUM_K_HEADS=hk, HALF=d // 2, BLOCK_H=triton.next_power_of_2(max(hq, hk)),
        BLOCK_HALF=triton.next_power_of_2(d // 2))


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < N
    g = tl.load(x_ptr + r * 2 * N + c, mask=mask, other=0.0)
    u = tl.load(x_ptr + r * 2 * N + N + c, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + r * N + c, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2N] contiguous (gate | up) -> silu(gate) * up, [T, N]."""
    x = x.contiguous()
    n = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    rows = x.numel() // (2 * n)
    if rows:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, N=n, BLOCK=block)
    return out


@triton.jit
def _qk_norm_rope_store_kernel(qkv_ptr, positions_ptr, cos_sin_ptr, q_weight_ptr, k_weight_ptr, slot_ptr,
                               k_cache_ptr, v_cache_ptr, eps, stride_t, NUM_Q_HEADS: tl.constexpr,
                               NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                               QK_NORM: tl.constexpr):
    # One program per (token, q or k head). A q head is normalised and rotated in place in the QKV
    # output (attention reads it there); a k head goes, normalised and rotated, straight into the cache,
    # together with its v head: nothing reads k or v from the QKV output afterwards.
    t = tl.program_id(0)
    h = tl.program_id(1)
    is_k = h >= NUM_Q_HEADS
    slot = tl.load(slot_ptr + t)
    if is_k & (slot < 0):  # padding row: no cache write, and its k is never read
        return
    i = tl.arange(0, BLOCK_HALF)
    imask = i < HALF
    row = qkv_ptr + t.to(tl.int64) * stride_t + h * 2 * HALF  # q heads, then k heads, then v heads
    x1 = tl.load(row + i, mask=imask, other=0.0)
    x2 = tl.load(row + HALF + i, mask=imask, other=0.0)
    if QK_NORM:  # the arithmetic of _rms_norm_kernel (and of HF): fp32, rounded, then times the weight
        if is_k:
            w1 = tl.load(k_weight_ptr + i, mask=imask, other=0.0).to(tl.float32)
            w2 = tl.load(k_weight_ptr + HALF + i, mask=imask, other=0.0).to(tl.float32)
        else:
            w1 = tl.load(q_weight_ptr + i, mask=imask, other=0.0).to(tl.float32)
            w2 = tl.load(q_weight_ptr + HALF + i, mask=imask, other=0.0).to(tl.float32)
        a1 = x1.to(tl.float32)
        a2 = x2.to(tl.float32)
        inv = 1.0 / tl.sqrt((tl.sum(a1 * a1, axis=0) + tl.sum(a2 * a2, axis=0)) / (2 * HALF) + eps)
        x1 = (w1 * (a1 * inv).to(x1.dtype).to(tl.float32)).to(x1.dtype)
        x2 = (w2 * (a2 * inv).to(x2.dtype).to(tl.float32)).to(x2.dtype)
    # rotary, the arithmetic of _rotary_kernel: cos/sin rounded to the model dtype, each product rounded
    pos = tl.load(positions_ptr + t).to(tl.int64)
    c = tl.load(cos_sin_ptr + pos * 4 * HALF + i, mask=imask, other=0.0).to(x1.dtype).to(tl.float32)
    s = tl.load(cos_sin_ptr + pos * 4 * HALF + 2 * HALF + i, mask=imask, other=0.0).to(x1.dtype).to(tl.float32)
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    o1 = ((a1 * c).to(x1.dtype).to(tl.float32) + (-a2 * s).to(x1.dtype).to(tl.float32)).to(x1.dtype)
    o2 = ((a2 * c).to(x1.dtype).to(tl.float32) + (a1 * s).to(x1.dtype).to(tl.float32)).to(x1.dtype)
    if is_k:
        dst = slot.to(tl.int64) * (NUM_KV_HEADS * 2 * HALF) + (h - NUM_Q_HEADS) * 2 * HALF
        tl.store(k_cache_ptr + dst + i, o1.to(k_cache_ptr.dtype.element_ty), mask=imask)
        tl.store(k_cache_ptr + dst + HALF + i, o2.to(k_cache_ptr.dtype.element_ty), mask=imask)
        v_row = row + NUM_KV_HEADS * 2 * HALF
        for half in tl.static_range(2):
            v = tl.load(v_row + half * HALF + i, mask=imask, other=0.0)
            tl.store(v_cache_ptr + dst + half * HALF + i, v, mask=imask)
    else:
        tl.store(row + i, o1, mask=imask)
        tl.store(row + HALF + i, o2, mask=imask)


def qk_norm_rope_store(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                       q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """q/k-norm (when the weights are given), rotary and the KV-cache store in one launch.

    qkv: [T, (Hq + 2 Hkv) * D], the QKV projection's output (last dim contiguous); caches
    [num_blocks, block_size, Hkv, D] contiguous; slot -1 = padding. Returns q, [T, Hq, D]: a view of qkv,
    normalised and rotated in place. k and v are only written to the cache (qkv's k/v parts are left as
    they were)."""
    num_tokens = qkv.shape[0]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    num_q_heads = qkv.shape[1] // head_dim - 2 * num_kv_heads
    assert qkv.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous() and head_dim % 2 == 0
    assert (q_weight is None) == (k_weight is None)
    q = qkv[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    if num_tokens == 0:
        return q
    _qk_norm_rope_store_kernel[(num_tokens, num_q_heads + num_kv_heads)](
        qkv, positions, cos_sin, q_weight if q_weight is not None else qkv,
        k_weight if k_weight is not None else qkv, slot_mapping, k_cache, v_cache, eps, qkv.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2,
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2), QK_NORM=q_weight is not None, num_warps=1)
    return q
