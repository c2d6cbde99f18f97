"""A request as the front end sees it: prompt, text so far, stop strings, metrics.

One RequestState is one completion (one sequence in the core); a request with n > 1 is n of them, whose
outputs `group_output` puts together."""

from __future__ import annotations

import time

from splitserve.engine.detokenizer import IncrementalDetokenizer, TokenTexts
from splitserve.engine.messages import CoreOutput
from splitserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from splitserve.sampling_params import SamplingParams


class RequestState:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, tokenizer, index: int = 0, fork_of: str | None = None,
                 parent_id: str | None = None, token_texts: TokenTexts | None = None):
        self.request_id = request_id
        self.parent_id = request_id if parent_id is None else parent_id  # the user's request (n completions)
        self.index = index  # which of the request's n completions
        self.fork_of = fork_of  # the completion whose prompt KV this one shares (n > 1)
        self.token_texts = token_texts or TokenTexts(tokenizer)  # the engine shares one
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.output_token_ids: list[int] = []
        self.output_text = ""
        self.logprobs: list[dict[int, float]] | None = [] if sampling_params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None
        self.num_cached_tokens = 0
        self.error: str | None = None  # the core refused it (CoreOutput.error)
        self.metrics = RequestMetrics(arrival_time=time.time())
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, sampling_params.skip_special_tokens)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def apply(self, out: CoreOutput, now: float) -> bool:
        """Add a core step's tokens; returns True when a stop string ended the request here (the core does
        not know: the caller aborts it there)."""
        m = self.metrics
        if out.scheduled_time is not None and m.first_scheduled_time is None:
            m.first_scheduled_time = out.scheduled_time
        self.num_cached_tokens = out.num_cached_tokens
        self.error = out.error or self.error
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = [None] + [self._decoded(entry) for entry in out.prompt_logprobs]
        stopped, last = False, len(out.new_token_ids) - 1
        for i, token in enumerate(out.new_token_ids):
            self.output_token_ids.append(token)
            m.first_token_time = m.first_token_time or now
            m.last_token_time = now
            m.token_times.append(now)
            if self.logprobs is not None and out.new_logprobs is not None:
                self.logprobs.append(self._decoded(out.new_logprobs[i]))
                self.cumulative_logprob += out.new_logprobs[i][token].logprob
            old_len = len(self.output_text)
            self.output_text += self.detokenizer.step(token)
            ended_by_token = i == last and out.finish_reason == "stop"  # EOS or a stop id: no stop string
            too_early = len(self.output_token_ids) < self.sampling_params.min_tokens  # as vLLM's stop checker
            if not ended_by_token and not too_early and self._find_stop_string(old_len):
                stopped = True
                break
        if not stopped and out.finish_reason is not None:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
        if self.is_finished:
            m.finished_time = now
        return stopped

    def _decoded(self, entry: dict[int, Logprob]) -> dict[int, Logprob]:
        for token, logprob in entry.items():
            logprob.decoded_token = self.token_texts(token)
        return entry

    def _find_stop_string(self, old_len: int) -> bool:
        for stop in self.sampling_params.stop_list:
            idx = self.output_text.find(stop, max(0, old_len - len(stop) + 1))
            if idx != -1:
                keep = len(stop) if self.sampling_params.include_stop_str_in_output else 0
                self.output_text = self.output_text[:idx + keep]
                self.finish_reason, self.stop_reason = "stop", stop
                return True
        return False

    def abort(self) -> None:
        if not self.is_finished:
            self.finish_reason = "abort"
            self.metrics.finished_time = time.time()

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index, text=self.output_text, token_ids=list(self.output_token_ids),
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=self.logprobs, finish_reason=self.finish_reason, stop_reason=self.stop_reason, error=self.error)

    def output(self) -> RequestOutput:
        return group_output([self])


def group_output(completions: list[RequestState]) -> RequestOutput:
    """One RequestOutput for a request's completions (the first one carries the prompt logprobs)."""
    first = completions[0]
    return RequestOutput(request_id=first.parent_id, prompt=first.prompt, prompt_token_ids=first.prompt_token_ids,
                         outputs=[c.completion() for c in completions],
                         finished=all(c.is_finished for c in completions), metrics=first.metrics,
                         num_cached_tokens=first.num_cached_tokens, prompt_logprobs=first.prompt_logprobs)
