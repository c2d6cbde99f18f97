"""Named model shapes with random weights (no hub): a config.json written locally, run with load_format=dummy."""

from __future__ import annotations

import json
import os
import shutil

from splitserve.models.loader import cache_dir

_QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu", vocab_size=151936,
              max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, head_dim=128,
              bos_token_id=151643, eos_token_id=151645, attention_bias=False, dtype="bfloat16")
SHAPES = {
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", vocab_size=128256,
                      hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                      rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192},
                      tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009, dtype="bfloat16"),
    # a tiny shape for CPU tests of the harness
    "tiny": dict(_QWEN3, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                 tie_word_embeddings=True),
}


def shape_folder(name: str, tokenizer: str | None = None) -> str:
    """The shape's folder (config.json only), or with `tokenizer`: a folder that also holds the tokenizer files
    of that folder (what structured outputs need; the model's vocabulary must be at least the tokenizer's)."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    folder = os.path.join(cache_dir(), "shapes", name if tokenizer is None else f"{name}+tokenizer")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(SHAPES[name], f, indent=1)
    if tokenizer is not None:
        if not os.path.isfile(os.path.join(tokenizer, "tokenizer_config.json")):
            raise ValueError(f"--tokenizer {tokenizer!r}: not a tokenizer folder (no tokenizer_config.json)")
        for entry in os.listdir(tokenizer):
            if entry != "config.json" and not entry.endswith((".safetensors", ".bin", ".gguf")):
                shutil.copy(os.path.join(tokenizer, entry), folder)
    return folder
