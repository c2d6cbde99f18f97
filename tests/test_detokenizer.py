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
