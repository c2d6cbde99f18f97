"""Decoder-only transformer for the Llama family (Llama 2/3, SmolLM2, Mistral), Qwen2 and Qwen3.

The families differ only in flags: Qwen3 normalises q and k per head, Qwen2 has a bias on q/k/v.
A layer is three stages with one signature, cut by what bounds them (issue 14):
- compute-pre: input norm (+ residual add), QKV projection;
- memory: q/k-norm, rotary, KV write, paged attention (`Attention.forward`: no GEMM, memory-bound);
- compute-post: output projection, post-attention norm, gate/up, SiLU-and-mul, down.
`DecoderLayer.forward` runs the three in order. Given a stage schedule (splitserve.pipeline: micro-batches
on a compute and a memory SM partition) `CausalLM.forward` hands the schedule the same stage functions, so
a pipelined step computes exactly what the plain one does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from splitserve.layers.attention import Attention, AttentionMetadata
from splitserve.layers.linear import Linear, gemv_fits
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
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=flags.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=flags.o_bias)
        self.qk_norm = flags.qk_norm
        if flags.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, backend)

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The memory-bound middle of attention, between the QKV and output projections (DecoderLayer
        runs those): q/k-norm (Qwen3 only), rotary, K/V into the paged cache (one kernel on CUDA), then
        paged attention. Returns [T, Hq, D]."""
        return self.attn(qkv, positions, self.rotary.cos_sin, self.q_norm if self.qk_norm else None,
                         self.k_norm if self.qk_norm else None, meta)


class MLP(nn.Module):
    def __init__(self, cfg, flags: ArchFlags):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=flags.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=flags.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x, silu_mul=True))


@dataclass
class Handoff:
    """What one stage hands the next, for one (micro-)batch: the residual stream, and the one tensor the
    next stage reads — `hidden` into compute-pre (and out of compute-post), `qkv` from compute-pre to
    memory, `attn` from memory to compute-post."""
    residual: torch.Tensor | None  # None before the first layer's input norm
    hidden: torch.Tensor | None = None
    qkv: torch.Tensor | None = None  # [T, (Hq + 2 Hkv) D]
    attn: torch.Tensor | None = None  # [T, Hq, D]


class DecoderLayer(nn.Module):
    def __init__(self, cfg, flags: ArchFlags, backend, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, flags, backend, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, flags)

    def compute_pre(self, positions: torch.Tensor, x: Handoff, meta: AttentionMetadata) -> Handoff:
        """Input norm (+ residual add), QKV projection."""
        if x.residual is None:
            hidden, residual = self.input_layernorm(x.hidden), x.hidden
        else:
            hidden, residual = self.input_layernorm(x.hidden, x.residual)
        return Handoff(residual, qkv=self.self_attn.qkv_proj(hidden))

    def memory(self, positions: torch.Tensor, x: Handoff, meta: AttentionMetadata) -> Handoff:
        """q/k-norm, rotary, KV write, paged attention: the only stage with no GEMM."""
        return Handoff(x.residual, attn=self.self_attn.attend(positions, x.qkv, meta))

    def compute_post(self, positions: torch.Tensor, x: Handoff, meta: AttentionMetadata) -> Handoff:
        """Output projection, post-attention norm (+ residual add), gate/up, SiLU-and-mul, down."""
        hidden = self.self_attn.o_proj(x.attn.flatten(1))
        hidden, residual = self.post_attention_layernorm(hidden, x.residual)
        return Handoff(residual, hidden=self.mlp(hidden))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        x = Handoff(residual, hidden=hidden)
        for stage in (self.compute_pre, self.memory, self.compute_post):
            x = stage(positions, x, meta)
        return x.hidden, x.residual


StageFn = Callable[[torch.Tensor, Handoff, AttentionMetadata], Handoff]


@dataclass(frozen=True)
class Stage:
    """A stretch of the forward that one stream runs for one (micro-)batch: `run(positions, x, meta)`."""
    kind: str  # "compute" | "memory": which partition a stage schedule places it on
    layer: int  # the layer it starts in
    name: str  # which layer stages it is made of, e.g. "post3+pre4"
    run: StageFn


def _then(first: StageFn, second: StageFn) -> StageFn:
    def run(positions: torch.Tensor, x: Handoff, meta: AttentionMetadata) -> Handoff:
        return second(positions, first(positions, x, meta), meta)
    return run


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
        """The layers' stages in the order `forward` runs them, compute and memory alternating:
        pre0 | attend0 | post0+pre1 | attend1 | ... | post(L-1). Between two attentions the compute work of
        two layers is one stage, so each stream runs one stage while the other runs one."""
        layers = self.layers
        stages = [Stage("compute", 0, "pre0", layers[0].compute_pre)]
        for i, layer in enumerate(layers):
            stages.append(Stage("memory", i, f"attend{i}", layer.memory))
            if i + 1 < len(layers):
                stages.append(Stage("compute", i, f"post{i}+pre{i + 1}",
                                    _then(layer.compute_post, layers[i + 1].compute_pre)))
            else:
                stages.append(Stage("compute", i, f"post{i}", layer.compute_post))
        return stages

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [N, V]; written into `out` when given (the CUDA graph sampler's static rows)."""
        weight = self.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight
        if gemv_fits(hidden, weight) and (out is None or (out.is_contiguous() and out.dtype == torch.float32)):
            from splitserve.kernels.gemv import gemv

            return gemv(hidden, weight, out_dtype=torch.float32, out=out)
        logits = torch.nn.functional.linear(hidden, weight)
        return logits.float() if out is None else out.copy_(logits)

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
