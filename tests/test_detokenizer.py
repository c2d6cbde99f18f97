from splitserve.engine.detokenizer import IncrementalDetokenizer


def test_incremental_detokenization_across_multibyte_characters(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    text = " naïve café — 東京で🍣を食べた 🤖👍🏽 Ωμέγα ✓"
    ids = tok.encode(text)
    prompt = tok.encode("Hello there:")
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.step(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)
    assert sum(1 for d in deltas if d == "") > 0  # some tokens were partial characters and held back


def test_decoder_takes_the_backend_only_where_the_text_is_the_same(default_model_dir):
    """The detokenizer decodes through the Rust tokenizer behind a fast tokenizer (its Python wrapper costs more
    than the decode); that must be the very text of `tokenizer.decode`, special tokens skipped or kept."""
    import random

    from transformers import AutoTokenizer

    from splitserve.engine.detokenizer import decoder

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    reference = tok.decode
    rng = random.Random(0)
    specials = tok.all_special_ids
    samples = [tok.encode(" naïve café — 東京で🍣を食べた 🤖👍🏽 Ωμέγα ✓  tabs\tand\nnewlines  ")]
    samples += [[rng.choice(specials + [rng.randrange(len(tok)) for _ in range(8)]) for _ in range(rng.randint(1, 12))]
                for _ in range(300)]
    for skip in (True, False):
        fast = decoder(tok, skip)
        tok.decode = None  # the fast path must not go through the wrapper at all
        try:
            assert [fast(ids) for ids in samples] == [reference(ids, skip_special_tokens=skip) for ids in samples]
        finally:
            del tok.decode

    class Custom(type(tok)):  # a tokenizer that changes its own decoding keeps it
        def _decode(self, token_ids, **kwargs):
            return "custom"

    tok.__class__ = Custom
    assert decoder(tok, True)([1, 2]) == "custom"
    tok.__class__ = Custom.__mro__[1]
    tok.clean_up_tokenization_spaces = True  # clean-up is the wrapper's work: keep the wrapper
    calls = []
    tok.decode = lambda ids, **kw: calls.append(ids) or "x"
    assert decoder(tok, True)([5]) == "x" and calls == [[5]]


def test_decode_stream_emits_what_the_window_emits(default_model_dir, monkeypatch):
    """Behind a fast tokenizer the detokenizer is the tokenizers library's DecodeStream: token by token the same text
    as the two-decode window (the reference here, with the stream turned off), special tokens skipped or kept,
    over random ids (partial characters, specials, prompts that end inside a character) and real text."""
    import random

    from transformers import AutoTokenizer

    from splitserve.engine import detokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    rng = random.Random(0)
    specials = tok.all_special_ids
    cases = [(tok.encode("Hello there:"), tok.encode(" naïve café — 東京で🍣を食べた 🤖👍🏽 Ωμέγα ✓"))]
    cases += [([rng.randrange(len(tok)) for _ in range(rng.randint(1, 9))],
               [rng.choice(specials + [rng.randrange(len(tok)) for _ in range(6)]) for _ in range(60)])
              for _ in range(300)]
    mid = tok.encode("Tokyo 🍣")[:-1]  # the emoji is several byte tokens: this prompt ends inside it
    assert tok.decode(mid).endswith("\ufffd")
    cases.append((mid, tok.encode("🍣 sushi")))
    streamed = 0
    for skip in (True, False):
        for prompt, out in cases:
            fast = IncrementalDetokenizer(tok, prompt, skip)
            streamed += fast._stream is not None
            with monkeypatch.context() as m:
                m.setattr(detokenizer, "rust_backend", lambda t: None)
                window = IncrementalDetokenizer(tok, prompt, skip)
            assert window._stream is None
            assert [fast.step(t) for t in out] == [window.step(t) for t in out], (prompt, out, skip)
    assert streamed > 500  # the stream served almost every case
