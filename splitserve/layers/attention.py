"""Paged attention and the backend seam: the only place where CPU and GPU code differ.

Every step first prepares the new tokens (q/k-norm where the model has it, rotary) and writes their K/V
into the paged cache, then each query attends over its sequence's cached keys (prefix-cache hits and
earlier prefill chunks included) with a causal offset. `TorchBackend` (torch ops, gather + SDPA) runs
anywhere and is the oracle; `TritonBackend` runs the kernels in `splitserve.kernels` on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.layers.norm import rms_norm_torch
from splitserve.layers.rotary import rotary_torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token; -1 = padding, skipped
    query_start_loc: torch.Tensor  # [S+1] int32: where each sequence's new tokens start in the batch
    seq_lens: torch.Tensor  # [S] int32: tokens in the cache after this step (0 = padding row)
    block_tables: torch.Tensor  # [S, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None


class TorchBackend:
    """Reference backend: gather each sequence's blocks and run SDPA with a causal offset."""

    name = "torch"

    def qk_norm_rope_store(self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                           q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                           k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """qkv [T, (Hq + 2 Hkv) D] -> q [T, Hq, D], normalised (with weights) and rotated; k (the same) and
        v go into the cache."""
        q, k, v = split_qkv(qkv, k_cache.shape[2], k_cache.shape[3])
        if q_weight is not None:
            q, k = rms_norm_torch(q, q_weight, eps), rms_norm_torch(k, k_weight, eps)
        q, k = rotary_torch(q, k, positions, cos_sin)
        self.store_kv(k, v, k_cache, v_cache, slot_mapping)
        return q

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
        v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        qsl = meta.query_start_loc_cpu or meta.query_start_loc.tolist()
        lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
        block_size = k_cache.shape[1]
        for i, seq_len in enumerate(lens):
            start, end = qsl[i], qsl[i + 1]
            if end == start:
                continue
            blocks = meta.block_tables[i, : -(-seq_len // block_size)].long()
            k = k_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)  # [Hkv, L, D]
            v = v_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)
            n = end - start
            q_pos = torch.arange(seq_len - n, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=True
            )
            out[start:end] = o.transpose(0, 1)
        return out


class TritonBackend:
    """CUDA backend: Triton kernels for q/k-norm + rotary + KV store and paged attention (decode and prefill).

    `fuse_qkv` False runs q-norm, k-norm, rotary and the KV store as separate launches instead of one (the
    layout before issue 15, kept to measure the fusion against: SPLITSERVE_FUSED_QKV=0)."""

    name = "triton"

    def __init__(self, fuse_qkv: bool | None = None):
        self.fuse_qkv = os.environ.get("SPLITSERVE_FUSED_QKV", "1") != "0" if fuse_qkv is None else fuse_qkv

    def qk_norm_rope_store(self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                           q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                           k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        from splitserve.kernels.fused import qk_norm_rope_store, rms_norm, rotary_

        if self.fuse_qkv:
            return qk_norm_rope_store(qkv, positions, cos_sin, q_weight, k_weight, eps, k_cache, v_cache,
                                      slot_mapping)
        q, k, v = split_qkv(qkv, k_cache.shape[2], k_cache.shape[3])
        if q_weight is not None:  # in place inside the QKV output
            rms_norm(q, q_weight, eps, out=q)
            rms_norm(k, k_weight, eps, out=k)
        rotary_(q, k, positions, cos_sin)
        self.store_kv(k, v, k_cache, v_cache, slot_mapping)
        return q

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        from splitserve.kernels.kv_store import store_kv

        store_kv(k, v, k_cache, v_cache, slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        from splitserve.kernels.paged_attention import paged_attention

        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                               meta.max_query_len, meta.max_seq_len, scale)


def make_backend(device: torch.device):
    return TritonBackend() if device.type == "cuda" else TorchBackend()


def split_qkv(qkv: torch.Tensor, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views [T, Hq, D], [T, Hkv, D], [T, Hkv, D] into a fused QKV projection output."""
    t = qkv.shape[0]
    q, k, v = qkv.split([qkv.shape[1] - 2 * num_kv_heads * head_dim] + [num_kv_heads * head_dim] * 2, dim=-1)
    return q.view(t, -1, head_dim), k.view(t, num_kv_heads, head_dim), v.view(t, num_kv_heads, head_dim)


class Attention(nn.Module):
    """Prepares this layer's new tokens (q/k-norm, rotary), stores their K/V, then attends. The runner binds
    `k_cache`/`v_cache` after allocation."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, backend):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.backend = backend
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, num_kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None

    def forward(self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                q_norm: nn.Module | None, k_norm: nn.Module | None, meta: AttentionMetadata) -> torch.Tensor:
        """qkv: [T, (Hq + 2 Hkv) D], the QKV projection's output; returns [T, Hq, D]."""
        q = self.backend.qk_norm_rope_store(
            qkv, positions, cos_sin, q_norm.weight if q_norm is not None else None,
            k_norm.weight if k_norm is not None else None, q_norm.eps if q_norm is not None else 0.0,
            self.k_cache, self.v_cache, meta.slot_mapping)
        return self.backend.attend(q, self.k_cache, self.v_cache, meta, self.scale)
