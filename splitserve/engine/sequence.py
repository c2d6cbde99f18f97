"""One request's state inside an engine core as it moves waiting → running → finished.

Token ids only: text, stop strings and metrics belong to the front end (engine.RequestState).
"""

from __future__ import annotations

import enum
from itertools import count

from splitserve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = count()

# A sampled token not yet read back from the device (async scheduling): it holds the token's place in
# `token_ids` so lengths, positions and block allocation are right; the next step's input for it is gathered
# on the device (worker/model_runner.py), and the core writes the real id in when the step resolves.
PLACEHOLDER = -1


class Sequence:
    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, request_id: str | None = None,
                 num_prompt_tokens: int | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.token_ids = list(token_ids)  # prompt followed by generated tokens
        self.num_prompt_tokens = len(token_ids) if num_prompt_tokens is None else num_prompt_tokens
        self.sampling_params = sampling_params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # prefix-cache hashes of the full blocks, in order
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # of those, how many came from the prefix cache (first admission)
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | None = None
        self.generator = None  # per-request torch.Generator when sampling_params.seed is set
        self.grammar = None  # structured_output.SequenceGrammar when sampling_params.structured_outputs is set
        self.scheduled_time: float | None = None  # first scheduled (wall clock)
        self.fork_from: Sequence | None = None  # n > 1: the sibling whose prompt KV this one shares (scheduler)
        # prompt_logprobs: entries for prompt tokens 1.. as chunks compute them (handed out with the first token)
        self.prompt_logprobs: list | None = [] if sampling_params.prompt_logprobs is not None else None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
