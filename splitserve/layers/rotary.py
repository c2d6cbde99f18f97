"""Rotary position embedding (neox / HF `rotate_half` layout) with a precomputed cos/sin table.

Frequencies come from transformers' own rope initialisers, so every rope_type HF supports
(linear, llama3, yarn, ...) matches it exactly; "default" is the plain 1/base^(2i/d).
"""

from __future__ import annotations

import torch
from torch import nn


def rope_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if getattr(hf_config, "partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")
    if rope_type == "default":
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """One table shared by all layers. `build(device)` fills it (the model is first built on 'meta'). The
    attention backend applies it (layers.attention: with q/k-norm and the KV store, one kernel on CUDA)."""

    def __init__(self, hf_config, head_dim: int, max_position: int):
        super().__init__()
        with torch.device("cpu"):
            self.inv_freq, self.scaling = rope_inv_freq(hf_config, head_dim)
        self.max_position = max_position
        self.cos_sin: torch.Tensor | None = None

    def build(self, device: torch.device) -> None:
        positions = torch.arange(self.max_position, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        # [max_position, 2, head_dim] in fp32: cos and sin side by side, one gather per step
        self.cos_sin = torch.stack((emb.cos(), emb.sin()), dim=1) * self.scaling


def rotary_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
    """Reference (and CPU) path, with HF's arithmetic: cos/sin rounded to the model dtype."""
    cs = cos_sin[positions].to(q.dtype)  # [T, 2, D]
    cos, sin = cs[:, 0].unsqueeze(1), cs[:, 1].unsqueeze(1)
    return _apply(q, cos, sin), _apply(k, cos, sin)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
