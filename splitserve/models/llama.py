"""Decoder-only transformer for the Llama family (Llama 2/3, SmolLM2, Mistral), Qwen2 and Qwen3.

The families differ only in flags: Qwen3 normalises q and k per head, Qwen2 has a bias on q/k/v.
A layer is two stages — attention and FFN — with one signature. `forward` runs every stage in order;
given a stage schedule (splitserve.pipeline: micro-batches on two SM partitions) it hands the schedule
the same stages, so a pipelined step computes exactly what the plain one does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from splitserve.layers.activation import silu_and_mul
from splitserve.layers.attention import Attention, AttentionMetadata
from splitserve.layers.norm import RMSNorm
from splitserve.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class ArchFlags:
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False


class SelfAttention(nn.Module):
    def __init__(self, cfg, flags: ArchFlags, backend, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=flags.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=flags.o_bias)
        self.qk_norm = flags.qk_norm
        if flags.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, backend)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        # q/k-norm (Qwen3 only), rotary, K/V into the paged cache (one kernel on CUDA), then attention
        o = self.attn(qkv, positions, self.rotary.cos_sin, self.q_norm if self.qk_norm else None,
                      self.k_norm if self.qk_norm else None, meta)
        return self.o_proj(o.view(x.shape[0], self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg, flags: ArchFlags):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=flags.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=flags.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, flags: ArchFlags, backend, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, flags, backend, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, flags)

    def attention_stage(self, positions, hidden, residual, meta: AttentionMetadata):
        """norm (+ residual add), QKV, rotary, KV write, attention, output projection."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        return self.self_attn(positions, hidden, meta), residual

    def ffn_stage(self, positions, hidden, residual, meta: AttentionMetadata):
        """norm (+ residual add), gate/up, SiLU-and-mul, down."""
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def forward(self, positions, hidden, residual, meta: AttentionMetadata):
        hidden, residual = self.attention_stage(positions, hidden, residual, meta)
        return self.ffn_stage(positions, hidden, residual, meta)


@dataclass(frozen=True)
class Stage:
    """One stage of one layer: `run(positions, hidden, residual, meta) -> (hidden, residual)`."""
    kind: str  # "attention" | "ffn": where a stage schedule places it
    layer: int
    run: Callable


StageSchedule = Callable  # (stages, positions, hidden, meta) -> (hidden, residual); see pipeline.pingpong


class CausalLM(nn.Module):
    def __init__(self, cfg, flags: ArchFlags, backend, max_position: int):
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} (only 'silu')")
        # _weight: no random init of a meta tensor, whose normal_ imports torch._dynamo (and Triton): seconds
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        self.rotary = RotaryEmbedding(cfg, head_dim, max_position)
        self.layers = nn.ModuleList(DecoderLayer(cfg, flags, backend, self.rotary)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                schedule: StageSchedule | None = None) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        if schedule is None:
            hidden, residual = self.run_layers(0, len(self.layers), positions, hidden, residual, meta)
        else:
            hidden, residual = schedule(self.stages(), positions, hidden, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def run_layers(self, start: int, end: int, positions: torch.Tensor, hidden: torch.Tensor,
                   residual: torch.Tensor | None, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers [start, end) of `forward` (the PD-multiplex prefill lane launches a few at a time)."""
        for layer in self.layers[start:end]:
            hidden, residual = layer(positions, hidden, residual, meta)
        return hidden, residual

    def stages(self) -> list[Stage]:
        """The layers as stages, in the order `forward` runs them."""
        return [Stage(kind, i, getattr(layer, f"{kind}_stage")) for i, layer in enumerate(self.layers)
                for kind in ("attention", "ffn")]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight).float()

    # ---- weight loading: HF names -> merged parameters ----
    _merged = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def load_weight(self, name: str, tensor: torch.Tensor) -> str | None:
        """Copy one checkpoint tensor into place; returns the parameter name filled, or None if unused."""
        if name.startswith("model."):
            name = name[len("model."):]
        if "rotary_emb" in name or (name.startswith("lm_head") and self.tie_word_embeddings):
            return None
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in self._merged:
            merged, shard = self._merged[parts[-2]]
            param_name = ".".join(parts[:-2] + [merged, parts[-1]])
            param = self.get_parameter(param_name)
            sizes = self._shard_sizes(param_name)
            offset = sum(sizes[:shard])
            target = param.data.narrow(0, offset, sizes[shard])
            if target.shape != tensor.shape:
                raise ValueError(f"weight {name}: shape {tuple(tensor.shape)} does not fit {tuple(target.shape)}")
            target.copy_(tensor)
            return f"{param_name}[{shard}]"
        try:
            param = self.get_parameter(name)
        except AttributeError:
            raise ValueError(f"unexpected weight {name!r} in checkpoint") from None
        if param.shape != tensor.shape:
            raise ValueError(f"weight {name}: shape {tuple(tensor.shape)} does not fit {tuple(param.shape)}")
        param.data.copy_(tensor)
        return name

    def _shard_sizes(self, param_name: str) -> list[int]:
        layer = self.layers[int(param_name.split(".")[1])]
        if "qkv_proj" in param_name:
            a = layer.self_attn
            return [a.q_size, a.kv_size, a.kv_size]
        half = layer.mlp.down_proj.in_features
        return [half, half]

    def expected_weights(self) -> set[str]:
        names = set()
        for name, _ in self.named_parameters():
            if name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
                names.update(f"{name}[{i}]" for i in range(3))
            elif name.endswith(("gate_up_proj.weight", "gate_up_proj.bias")):
                names.update(f"{name}[{i}]" for i in range(2))
            else:
                names.add(name)
        return names
