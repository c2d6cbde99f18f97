"""What passes between the front end and an engine core: typed records of plain values (no tensors).

A core takes `CoreRequest`s (token ids, never text) and answers each step with `CoreOutput`s (new token
ids and finish events). The same records cross a process boundary in two-device PD (disagg/).
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.outputs import Logprob
from splitserve.sampling_params import SamplingParams


class CoreDiedError(RuntimeError):
    """The core client lost its core (a worker process died): nothing more can run on this engine."""


@dataclass(frozen=True)
class CoreRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    fork_of: str | None = None  # n > 1: a request with the same prompt whose prompt KV this one shares


@dataclass(frozen=True)
class CoreOutput:
    """What one step added to one request. The core finishes a request on EOS, a stop token, max_tokens or
    max_model_len; stop strings are text, so the front end finds them and aborts the request in the core."""
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, Logprob]] | None  # one {token id: Logprob} per new token, when asked for
    finish_reason: str | None = None  # "stop" | "length" | None while running
    stop_reason: int | None = None  # the stop token id that ended it, if one did
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (first admission)
    scheduled_time: float | None = None  # set on a request's first output: when it was first scheduled
    prompt_logprobs: list[dict[int, Logprob]] | None = None  # prompt tokens 1.. (on the first output, if asked)
    error: str | None = None  # why the core refused the request (finish "abort", no tokens): its grammar did not
    # compile in time, or a worker could not take it


@dataclass(frozen=True)
class CoreGauges:
    """The few numbers a server exports after every step (cheap: no stats() walk)."""
    running: int
    waiting: int
    kv_usage: float
    num_preemptions: int
    decode_path: str  # "cuda_graph" | "pipeline" | "eager" | "cuda_graph_pd_partition"
    decode_memory_sm: int | None = None  # the decode pipeline's split (pipeline/pingpong.py)
    decode_compute_sm: int | None = None
    pd_decode_sm: int | None = None  # PD multiplexing: the decode partition while a prefill runs beside it
