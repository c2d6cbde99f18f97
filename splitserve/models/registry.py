"""Which HF architectures splitserve runs, and with which flags."""

from __future__ import annotations

from splitserve.models.llama import ArchFlags


def arch_flags(hf_config) -> ArchFlags:
    archs = list(getattr(hf_config, "architectures", None) or [])
    arch = archs[0] if archs else None
    bias = bool(getattr(hf_config, "attention_bias", False))
    mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
    if arch == "LlamaForCausalLM":
        return ArchFlags(qkv_bias=bias, o_bias=bias, mlp_bias=mlp_bias)
    if arch == "Qwen2ForCausalLM":
        return ArchFlags(qkv_bias=True)
    if arch == "Qwen3ForCausalLM":
        return ArchFlags(qk_norm=True, qkv_bias=bias, o_bias=bias)
    raise ValueError(
        f"unsupported model architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
