"""How close to a tie is the exact fp32 HF test (tests/test_gpu.py::test_fp32_greedy_matches_hf_exactly)?

CPU, the test's model construction (Qwen3-0.6B shape, seed 0, bf16 round trip, fp32) and prompts: HF fp32
greedy for 40 steps, then per step the top-2 gap of the logits, and how much the lm_head GEMM moves when
the rows are batched as the engine does (3 sequences) or padded to a graph bucket (4 rows), against HF's
one row. Usage: python scripts/hf_fp32_gap_probe.py [OUT_JSON]   (~1-2 minutes, ~6 GB of memory)
"""

import json
import sys

import torch
import transformers

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=151643,
                 eos_token_id=151645, initializer_range=0.02)


def random_prompts(n, lo, hi, seed=0, vocab=49152):  # tests/conftest.py's
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (n_,), generator=g).tolist() for n_ in lens]


def main() -> None:
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(**QWEN3_06B)
    model = transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16).float().eval()
    prompts = random_prompts(3, 20, 200, seed=0, vocab=151936)
    weight = model.lm_head.weight
    hidden, tokens = [], []
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=40, min_new_tokens=40,
                               do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            hidden.append(model.model(torch.tensor([p + y])).last_hidden_state[0, len(p) - 1:-1])
            tokens.append(y)
        steps = []
        for step in range(40):
            rows = torch.stack([h[step] for h in hidden])
            one = torch.stack([torch.nn.functional.linear(r[None], weight)[0] for r in rows])  # HF: 1 row
            batched = torch.nn.functional.linear(rows, weight)  # the engine's eager lm_head: 3 rows
            padded = torch.nn.functional.linear(torch.cat([rows, torch.zeros_like(rows[:1])]), weight)[:3]
            for i in range(3):
                top = one[i].topk(2)
                steps.append({"prompt": i, "step": step, "hf_token": tokens[i][step],
                              "gap": float(top.values[0] - top.values[1]),
                              "argmax_1_3_4_rows": [int(one[i].argmax()), int(batched[i].argmax()),
                                                    int(padded[i].argmax())],
                              "diff_3_rows": float((batched[i] - one[i]).abs().max()),
                              "diff_4_rows": float((padded[i] - one[i]).abs().max())})
    summary = {"transformers": transformers.__version__, "torch": torch.__version__,
               "min_top2_gap": min(s["gap"] for s in steps),
               "max_logit_diff_3_rows": max(s["diff_3_rows"] for s in steps),
               "max_logit_diff_4_rows_padded": max(s["diff_4_rows"] for s in steps),
               "argmax_changes": sum(len(set(s["argmax_1_3_4_rows"])) > 1 for s in steps),
               "first_tokens": [t[:5] for t in tokens]}
    print(json.dumps(summary, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"summary": summary, "steps": steps}, f, indent=1)


if __name__ == "__main__":
    main()
