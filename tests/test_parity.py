"""Token-exact greedy parity with HF transformers (fp32, CPU) on models HF itself created and saved."""

import pytest
from conftest import hf_greedy, random_prompts

from splitserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)

VARIANTS = {
    "qwen3-gqa-untied": ("qwen3", {}),
    "qwen3-mha-tied": ("qwen3", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-gqa-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-mha-untied-bias": ("llama", dict(num_key_value_heads=4, attention_bias=True)),
    "llama3-rope-scaling": ("llama", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2-bias": ("qwen2", dict(num_key_value_heads=2)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_hf_single_and_batched(make_tiny_model, variant):
    arch, overrides = VARIANTS[variant]
    path = make_tiny_model(arch, **overrides)
    prompts = random_prompts(4, 3, 40, seed=1)
    expected = hf_greedy(path, prompts, 32)
    llm = LLM(path, kvcache_block_size=8, max_num_batched_tokens=256)
    single = [llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert single == expected
    assert batched == expected


@pytest.mark.slow  # HF generate on the 135M model, the oracle for the default model
def test_default_model_matches_hf(default_model_dir, default_llm):
    llm = default_llm
    tok = llm.get_tokenizer()
    texts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    prompts = [tok.encode(t) for t in texts]
    expected = hf_greedy(default_model_dir, prompts, 32)
    outs = llm.generate(texts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert [o.prompt_token_ids for o in outs] == prompts
    assert outs[0].outputs[0].text == tok.decode(expected[0], skip_special_tokens=True)


def test_sharded_checkpoint_loads(make_tiny_model):
    import glob

    path = make_tiny_model("qwen3", seed=4, max_shard_size="2MB")
    assert len(glob.glob(f"{path}/*.safetensors")) > 1
    prompts = random_prompts(2, 5, 30, seed=7)
    expected = hf_greedy(path, prompts, 32)
    llm = LLM(path)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
