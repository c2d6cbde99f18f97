"""SamplingParams in vLLM's shape; invalid values raise before any work starts.

Every number is bounded here, not only typed: a value the sampler cannot represent (a seed beyond 64 bits,
a top_k beyond int64) would otherwise fail inside an engine step, and a step failure fails every request
in the batch, not just the one that carried the bad value.
"""

from __future__ import annotations

import functools
import logging
import math
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


@functools.cache
def _warn_once(message: str) -> None:  # once per process: a server must not log it for every request
    logger.warning(message)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
    skip_special_tokens: bool = True
    n: int = 1
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.n != 1:
            raise ValueError(f"n must be 1 (parallel sampling is not supported), got {self.n!r}")
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
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be None or an integer in [-2**63, 2**63 - 1], got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or s == "" for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop_list = stops
        ids = self.stop_token_ids or []
        if any(not _is_int(t) or t < 0 for t in ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
