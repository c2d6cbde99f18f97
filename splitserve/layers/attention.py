"""Paged attention and the backend seam: the only place where CPU and GPU code differ.

Every step first writes the new tokens' K/V into the paged cache, then each query attends over its
sequence's cached keys (prefix-cache hits and earlier prefill chunks included) with a causal offset.
`TorchBackend` (gather + SDPA) runs anywhere and is the oracle; `TritonBackend` runs the kernels in
`splitserve.kernels` on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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
    """CUDA backend: Triton kernels for the KV store and paged attention (decode and prefill)."""

    name = "triton"

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        from splitserve.kernels.kv_store import store_kv

        store_kv(k, v, k_cache, v_cache, slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        from splitserve.kernels.paged_attention import paged_attention

        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                               meta.max_query_len, meta.max_seq_len, scale)


def make_backend(device: torch.device):
    return TritonBackend() if device.type == "cuda" else TorchBackend()


class Attention(nn.Module):
    """Stores this layer's new K/V, then attends. The runner binds `k_cache`/`v_cache` after allocation."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, backend):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.backend = backend
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, num_kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        self.backend.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.backend.attend(q, self.k_cache, self.v_cache, meta, self.scale)
