"""Incremental detokenization that never emits half a multi-byte character.

Decodes a small window of tokens twice (with and without the newest ones) and emits only the new suffix,
holding it back while it ends in U+FFFD (an incomplete UTF-8 sequence). The window starts with the last
prompt tokens so that tokenizers that drop a leading space at the start of a decode behave.
"""

from __future__ import annotations

from collections.abc import Callable

_PROMPT_CONTEXT = 5


def rust_backend(tokenizer):
    """The Rust tokenizer behind a fast tokenizer whose decode is that tokenizer's very text (a fast tokenizer's
    decode is the backend's plus an optional clean-up), else None."""
    from transformers import PreTrainedTokenizerFast  # TokenizersBackend in transformers 5

    cls = type(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    if (isinstance(tokenizer, PreTrainedTokenizerFast) and backend is not None
            and cls.decode is PreTrainedTokenizerFast.decode and cls._decode is PreTrainedTokenizerFast._decode
            and not getattr(tokenizer, "clean_up_tokenization_spaces", True)):
        return backend
    return None


def decoder(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=...)`, called on the Rust tokenizer behind it where that is the
    same text: its Python wrapper costs more than the decode itself (6.4 against 1.5 µs on Qwen's tokenizer)."""
    backend = rust_backend(tokenizer)
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Runs for every row of every step on the engine thread. Behind a fast tokenizer it is the tokenizers library's
    own `DecodeStream` (one Rust call a token: 2.9 against 6.3 µs for the two decodes of the window below, Qwen's
    tokenizer), which emits the same text, except where the prompt's last tokens end inside a character: there it
    would emit that character's bytes with the first output token, so such a prompt keeps the window."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode = decoder(tokenizer, skip_special_tokens) if tokenizer is not None else None
        self.tokens = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self._stream = self._backend = None
        backend = rust_backend(tokenizer) if tokenizer is not None else None
        if backend is not None and not self._decode(self.tokens).endswith("\ufffd"):
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(ids=self.tokens, skip_special_tokens=skip_special_tokens)
            self._backend = backend

    def step(self, token_id: int) -> str:
        if self._stream is not None:
            return self._stream.step(self._backend, token_id) or ""
        if self.tokenizer is None:
            return ""
        self.tokens.append(token_id)
        prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        text = self._decode(self.tokens[self.prefix_offset:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return text[len(prefix_text):]
        return ""


class TokenTexts:
    """Each token id's own text (a Logprob's `decoded_token`), decoded once per id: logprobs name up to 21
    tokens per position, and a long prompt's prompt_logprobs tens of thousands, all on the engine thread."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.texts: dict[int, str] = {}  # at most the vocabulary

    def __call__(self, token: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self.texts.get(token)
        if text is None:
            text = self.texts[token] = self.tokenizer.decode([token])
        return text
