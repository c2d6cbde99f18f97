"""LLMEngine: the front end. Tokenizes and validates requests, talks to an engine core through a core
client, and turns its token ids into text, stop strings, metrics and `RequestOutput`s.

The core client is an `EngineCore` in this process; with `engine_core_process`, a `CoreProcClient` over
the same core in a process of its own (core_client.py); with `enable_two_gpu_pd`, a `PDClient` over a
prefill and a decode worker (disagg/coordinator.py). All answer the same calls:

    add(CoreRequest)   abort([request ids])   step() -> [CoreOutput]   has_unfinished()   alive()
    gauges() -> CoreGauges   stats() -> dict   max_model_len   shutdown()
"""

from __future__ import annotations

import dataclasses
import time
from typing import Protocol

from splitserve.config import EngineConfig
from splitserve.engine import structured_output
from splitserve.engine.detokenizer import TokenTexts
from splitserve.engine.messages import CoreGauges, CoreOutput, CoreRequest
from splitserve.engine.request_state import RequestState
from splitserve.models.loader import load_tokenizer, resolve_model, resolve_model_spec
from splitserve.outputs import RequestOutput
from splitserve.sampling_params import SamplingParams, as_python


class PromptTooLongError(ValueError):
    """The prompt leaves no room for a new token within max_model_len."""


class CoreClient(Protocol):
    max_model_len: int

    def add(self, request: CoreRequest) -> None: ...
    def abort(self, request_ids: list[str]) -> None: ...
    def step(self) -> list[CoreOutput]: ...
    def has_unfinished(self) -> bool: ...
    def alive(self) -> bool: ...
    def gauges(self) -> CoreGauges: ...
    def stats(self) -> dict: ...
    def shutdown(self) -> None: ...


def make_core_client(config: EngineConfig, model) -> CoreClient:
    if config.enable_two_gpu_pd:
        from splitserve.disagg.coordinator import PDClient

        return PDClient(config, model)
    if config.engine_core_process:
        from splitserve.engine.core_client import CoreProcClient

        return CoreProcClient(config, model)
    from splitserve.engine.core import EngineCore

    return EngineCore(config, model)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        t0 = time.perf_counter()
        self.config = config
        self.tokenizer = load_tokenizer(resolve_model(config.model))
        self.token_texts = TokenTexts(self.tokenizer)
        self.model = resolve_model_spec(config, self.tokenizer)
        self.vocab_size = self.model.hf_config.vocab_size
        self.core = make_core_client(config, self.model)
        self.max_model_len = self.core.max_model_len
        self.requests: dict[str, RequestState] = {}
        self._next_id = 0
        self.startup_time_s = time.perf_counter() - t0

    def shutdown(self) -> None:
        self.core.shutdown()

    # ---- requests ----
    def make_request(self, prompt, sampling_params: SamplingParams | None = None,
                     request_id: str | None = None) -> RequestState:
        """`make_requests` for a request of one completion (n = 1)."""
        requests = self.make_requests(prompt, sampling_params, request_id)
        if len(requests) > 1:
            raise ValueError("n > 1 makes one request per completion: use make_requests")
        return requests[0]

    def make_requests(self, prompt, sampling_params: SamplingParams | None = None,
                      request_id: str | None = None) -> list[RequestState]:
        """Tokenize and validate one request; raises ValueError/TypeError naming the problem. Returns its n
        completions (ids: `request_id`, or `{i}_{request_id}` for n > 1, as vLLM's), which share the prompt's
        KV in the core. Adds nothing; safe from any thread."""
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        # The request's own copy, checked again (the checks run when a SamplingParams is built, and its fields
        # can be set after that): a value changed since fails here, and a later change cannot reach the request.
        so = params.structured_outputs
        params = dataclasses.replace(params, structured_outputs=None if so is None else dataclasses.replace(so))
        text = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer: pass prompts as token-id lists")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
            if token_ids and max(token_ids) >= self.vocab_size:  # else the step would fail every request in it
                raise ValueError(f"the tokenizer gave token id {max(token_ids)}, outside this model's vocabulary "
                                 f"[0, {self.vocab_size}): the model folder's tokenizer does not fit its model")
        elif isinstance(prompt, (list, tuple)) or (hasattr(prompt, "tolist") and getattr(prompt, "ndim", 0) == 1):
            ids = prompt.tolist() if hasattr(prompt, "tolist") else prompt  # a 1-d numpy array or tensor too
            token_ids = [t if type(t) is int else as_python(t) for t in ids]
            not_ints = [t for t in token_ids if type(t) is not int]
            if not_ints:
                raise ValueError(f"prompt token ids must be integers, got {not_ints[:5]}")
            bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        else:
            raise TypeError(f"a prompt must be str, list[int] or dict, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt is empty (no tokens)")
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(f"prompt has {len(token_ids)} tokens but max_model_len is "
                                     f"{self.max_model_len} (the prompt must leave room for one new token)")
        bad_stop = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad_stop:
            raise ValueError(f"stop_token_ids outside the vocabulary: {bad_stop}")
        bad_bias = [t for t in params.logit_bias or () if t >= self.vocab_size]
        if bad_bias:
            raise ValueError(f"logit_bias token ids outside the vocabulary [0, {self.vocab_size}): {bad_bias[:5]}")
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need the model's tokenizer, and this model folder has none")
            structured_output.check(params.structured_outputs)  # a bad schema / regex / grammar: ValueError
        if request_id is None:
            request_id, self._next_id = f"req-{self._next_id}", self._next_id + 1
        if params.n == 1:
            return [RequestState(request_id, text, token_ids, params, self.tokenizer, token_texts=self.token_texts)]
        ids = [f"{i}_{request_id}" for i in range(params.n)]
        return [RequestState(rid, text, token_ids, params.for_completion(i), self.tokenizer, i,
                             fork_of=None if i == 0 else ids[0], parent_id=request_id, token_texts=self.token_texts)
                for i, rid in enumerate(ids)]

    def chat_prompt(self, conversation: list[dict], add_generation_prompt: bool = True,
                    **template_kwargs) -> tuple[str, list[int]]:
        """A conversation rendered with the tokenizer's chat template: (text, token ids)."""
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("this model has no chat template")
        text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       **template_kwargs)
        return text, tok.encode(text, add_special_tokens=False)

    def add(self, request: RequestState) -> None:
        """Hand a validated request to the core; raises ValueError (nothing added) if the core refuses it."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.core.add(CoreRequest(request.request_id, request.prompt_token_ids, request.sampling_params,
                                  request.fork_of))
        self.requests[request.request_id] = request

    def add_request(self, prompt, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None) -> RequestState:
        request = self.make_request(prompt, sampling_params, request_id)
        self.add(request)
        return request

    def abort(self, request_id: str) -> bool:
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return False
        request.abort()
        self.core.abort([request_id])
        return True

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    # ---- one step ----
    def step(self) -> list[RequestState]:
        """One core step; returns the requests that got tokens (or finished)."""
        outputs = self.core.step()
        now = time.time()
        updated, stopped = {}, []
        for out in outputs:
            request = self.requests.get(out.request_id)
            if request is None or request.is_finished:
                continue  # aborted or stopped here; a PD worker may have run one more step
            if request.apply(out, now):
                stopped.append(out.request_id)
            updated[out.request_id] = request
        if stopped:
            self.core.abort(stopped)
        return list(updated.values())

    def output_of(self, request: RequestState) -> RequestOutput:
        return request.output()

    def release(self, request: RequestState) -> None:
        """Forget a finished request (after its output was taken)."""
        self.requests.pop(request.request_id, None)

    def gauges(self) -> CoreGauges:
        return self.core.gauges()

    def stats(self) -> dict:
        return {**self.core.stats(), "max_model_len": self.max_model_len,
                "startup_time_s": self.startup_time_s}
