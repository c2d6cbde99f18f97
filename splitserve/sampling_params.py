"""SamplingParams in vLLM's shape; invalid values raise before any work starts.

Every number is bounded here, not only typed: a value the sampler cannot represent (a seed beyond 64 bits,
a top_k beyond int64) would otherwise fail inside an engine step, and a step failure fails every request
in the batch, not just the one that carried the bad value.
"""

from __future__ import annotations

import dataclasses
import functools
import json as json_module
import logging
import math
import numbers
from dataclasses import dataclass, field

logger = logging.getLogger("splitserve")

# torch.Generator.manual_seed takes [-2**63, 2**64) (negative seeds wrap modulo 2**64); we accept the signed
# 64-bit range, as vLLM does, so a seed also fits any int64 tensor or C long it may be put in.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
TOP_K_MAX = 2**31 - 1  # anything >= the vocabulary means "all tokens"; int32 keeps every kernel safe
TEMPERATURE_MAX = 100.0  # real logits spread over tens: at 100, sampling is already close to uniform
# A tiny temperature blows logits / temperature past float32's range (below ~1e-37 for logits of ~10: inf,
# then NaN after softmax, and the sampler returned token 0 every time). vLLM raises any temperature below
# 0.01 to 0.01, and so do we: sampling at 0.01 is already all but greedy.
TEMPERATURE_FLOOR = 1e-2
MAX_LOGPROBS = 20  # top logprobs per token, as OpenAI (and vLLM's default max_logprobs)
PENALTY_MAX = 2.0  # presence/frequency penalties: OpenAI's range [-2, 2]
REPETITION_PENALTY_MAX = 100.0  # HF's repetition penalty: > 0 (1 = off); useful values are ~1-2
LOGIT_BIAS_MAX = 100.0  # as OpenAI: a bias in [-100, 100] (either end all but bans or forces the token)
MAX_LOGIT_BIAS = 1024  # entries in one logit_bias
MAX_N = 128  # completions per prompt (each is a sequence in the batch)
# Structured outputs: a hostile schema or regex must not hang the server, so its text and nesting are bounded
# here (the grammar compile that follows runs off the step loop, under a time limit: engine/structured_output.py).
MAX_STRUCTURED_CHARS = 64 << 10  # characters of a JSON schema, regex or grammar
MAX_SCHEMA_DEPTH = 32  # nesting of a JSON schema's objects and arrays
MAX_CHOICES = 1024


@functools.cache
def _warn_once(message: str) -> None:  # once per process: a server must not log it for every request
    logger.warning(message)


def as_python(value):
    """A numpy scalar or array (0-d included) as the Python number, bool or list it holds; anything else as it is."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "dtype") and hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):  # Fraction and the like
        return float(value)
    return value


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _depth(value, limit: int) -> int:
    """Nesting depth of a JSON value, counted only up to `limit` + 1 (iterative: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                break
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


@dataclass
class StructuredOutputsParams:
    """vLLM's structured outputs: exactly one of `json` (a JSON schema, dict or str), `regex`, `choice` (the
    output is one of these strings), `grammar` (xgrammar's EBNF, GBNF-style) or `json_object` (any JSON
    object). Shapes and sizes are checked here; whether the schema / regex / grammar parses is checked by the
    engine before the request is queued (engine/structured_output.py)."""
    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        kinds = ("json", "regex", "choice", "grammar", "json_object")
        given = [k for k in kinds if getattr(self, k) is not None and getattr(self, k) is not False]
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, grammar, json_object; "
                             f"got {', '.join(given) if given else 'none'}")
        if self.json is not None:
            if isinstance(self.json, str):
                if len(self.json) > MAX_STRUCTURED_CHARS:
                    raise ValueError(f"json schema has more than {MAX_STRUCTURED_CHARS} characters")
                try:
                    schema = json_module.loads(self.json)
                except (ValueError, RecursionError) as e:
                    raise ValueError(f"json schema is not valid JSON: {e}") from None
            elif isinstance(self.json, dict):
                schema = self.json
            else:
                raise ValueError(f"json schema must be a dict or a JSON string, got {type(self.json).__name__}")
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"json schema must be a JSON object, got {type(schema).__name__}")
            if _depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
                raise ValueError(f"json schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
            if isinstance(self.json, dict):
                try:
                    text = json_module.dumps(schema)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"json schema is not JSON-serialisable: {e}") from None
                if len(text) > MAX_STRUCTURED_CHARS:
                    raise ValueError(f"json schema has more than {MAX_STRUCTURED_CHARS} characters")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or len(value) > MAX_STRUCTURED_CHARS):
                raise ValueError(f"{name} must be a non-empty string of at most {MAX_STRUCTURED_CHARS} characters")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not 0 < len(self.choice) <= MAX_CHOICES
                    or any(not isinstance(c, str) or not c for c in self.choice)
                    or sum(map(len, self.choice)) > MAX_STRUCTURED_CHARS):
                raise ValueError(f"choice must be a list of 1 to {MAX_CHOICES} non-empty strings "
                                 f"({MAX_STRUCTURED_CHARS} characters in all)")
            self.choice = list(self.choice)
        if self.json_object not in (None, True, False):
            raise ValueError(f"json_object must be a bool, got {self.json_object!r}")

    def spec(self) -> tuple[str, str]:
        """(kind, text): what the grammar backend compiles; equal pairs give the same grammar (its cache key)."""
        if self.json is not None:
            return "json", self.json if isinstance(self.json, str) else json_module.dumps(self.json)
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json_module.dumps(self.choice)
        if self.grammar is not None:
            return "grammar", self.grammar
        return "json_object", ""


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    max_tokens: int = 16
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs returned per token (besides the sampled one)
    prompt_logprobs: int | None = None  # the same for each prompt token (computes logits over the whole prompt)
    skip_special_tokens: bool = True
    n: int = 1  # completions of the prompt; they share its KV, and completion i is seeded with seed + i
    presence_penalty: float = 0.0  # OpenAI: minus this from the logit of every token already in the output
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output
    repetition_penalty: float = 1.0  # HF: a token in the prompt or output: logit / p if positive, else * p
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings cannot end the request before this many tokens
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit (keys may be "123")
    include_stop_str_in_output: bool = False  # keep the stop string that ended the request in the text
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output (JSON schema, regex, ...)
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numpy values (a seed from np.random, a float32 top_p) as Python's
            if f.init:
                setattr(self, f.name, as_python(getattr(self, f.name)))
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature <= TEMPERATURE_MAX:
            raise ValueError(f"temperature must be >= 0 and <= {TEMPERATURE_MAX:g} (a finite number), "
                             f"got {self.temperature!r}")
        if 0 < self.temperature < TEMPERATURE_FLOOR:
            _warn_once(f"temperatures below {TEMPERATURE_FLOOR:g} are raised to it, as in vLLM (tiny ones overflow)")
            self.temperature = TEMPERATURE_FLOOR
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= TOP_K_MAX:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or in [1, {TOP_K_MAX}], got {self.top_k!r}")
        if not _is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX - self.n + 1):
            raise ValueError(f"seed must be None or an integer in [-2**63, 2**63 - n] (completion i takes seed + i), "
                             f"got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or s == "" for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop_list = stops
        ids = [as_python(t) for t in self.stop_token_ids or []]
        if any(not _is_int(t) or t < 0 for t in ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(ids)
        for name, lo, hi in (("presence_penalty", -PENALTY_MAX, PENALTY_MAX),
                             ("frequency_penalty", -PENALTY_MAX, PENALTY_MAX)):
            v = getattr(self, name)
            if not _is_real(v) or not lo <= v <= hi:
                raise ValueError(f"{name} must be in [{lo:g}, {hi:g}] (a finite number), got {v!r}")
        if not _is_real(self.repetition_penalty) or not 0 < self.repetition_penalty <= REPETITION_PENALTY_MAX:
            raise ValueError(f"repetition_penalty must be > 0 and <= {REPETITION_PENALTY_MAX:g} (1 = off), "
                             f"got {self.repetition_penalty!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        self.logit_bias = self._checked_logit_bias(self.logit_bias)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams, "
                             f"got {type(self.structured_outputs).__name__}")

    @staticmethod
    def _checked_logit_bias(bias) -> dict[int, float] | None:
        """{token id: bias} with int ids (OpenAI's JSON sends them as strings: "50256"); None when empty."""
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
        out = {}
        for key, value in bias.items():
            key, value = as_python(key), as_python(value)
            tid = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
            if not _is_int(tid) or tid < 0:
                raise ValueError(f"logit_bias keys must be non-negative token ids, got {key!r}")
            if not _is_real(value) or not -LOGIT_BIAS_MAX <= value <= LOGIT_BIAS_MAX:
                raise ValueError(f"logit_bias values must be in [-{LOGIT_BIAS_MAX:g}, {LOGIT_BIAS_MAX:g}], "
                                 f"got {value!r} for token {key!r}")
            out[tid] = float(value)
        return out or None

    def for_completion(self, index: int) -> SamplingParams:
        """The params of completion `index` of n (vLLM's): n=1, seed + index; prompt logprobs only once."""
        if self.n == 1:
            return self
        return dataclasses.replace(self, n=1, seed=None if self.seed is None else self.seed + index,
                                   prompt_logprobs=self.prompt_logprobs if index == 0 else None)

    @property
    def has_penalties(self) -> bool:
        """Anything the sampler must apply to the logits before temperature (one of these makes a batch slow)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or self.min_tokens > 0 or self.logit_bias is not None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
