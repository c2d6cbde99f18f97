"""LLM: the offline API (vLLM's shape) over the LLMEngine front end."""

from __future__ import annotations

import logging
from collections.abc import Sequence as SequenceABC

from tqdm.auto import tqdm

from splitserve.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.request_state import group_output
from splitserve.outputs import RequestOutput
from splitserve.sampling_params import SamplingParams

logger = logging.getLogger("splitserve")


class LLM:
    def __init__(self, model: str | None = None, **engine_args):
        self.config = EngineConfig.from_kwargs(model, **engine_args)
        self.engine = LLMEngine(self.config)

    def shutdown(self) -> None:
        """Stop worker processes now (PD mode); otherwise they stop when the LLM is garbage-collected."""
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        # Validate every request before any work starts, so one bad prompt costs nothing.
        groups = []  # per prompt: its n completions
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                groups.append(self.engine.make_requests(prompt, p))
            except (ValueError, TypeError) as e:
                raise type(e)(f"prompt {i}: {e}") from None
        requests = [r for group in groups for r in group]
        try:
            for request in requests:
                self.engine.add(request)
            with tqdm(total=len(requests), desc="generate", disable=not use_tqdm, unit="seq") as bar:
                while any(not r.is_finished for r in requests):
                    finished = sum(r.is_finished for r in self.engine.step())
                    bar.update(finished)
        except BaseException:
            for request in requests:
                self.engine.abort(request.request_id)
            raise
        finally:
            outputs = [group_output(group) for group in groups]
            for request in requests:
                self.engine.release(request)
        refused = [r for r in requests if r.error is not None]
        if refused:  # their outputs say why (CompletionOutput.error); say it here too, once
            logger.warning("%d of %d requests were refused by the engine (finish_reason 'abort', no text); "
                           "the first: %s", len(refused), len(requests), refused[0].error)
        return outputs

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """`messages`: one conversation (list of {"role", "content"}) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        rendered = [self.engine.chat_prompt(conv, add_generation_prompt, **(chat_template_kwargs or {}))
                    for conv in conversations]
        prompts = [text for text, _ in rendered]
        token_ids = [ids for _, ids in rendered]
        outputs = self.generate(token_ids, sampling_params, use_tqdm=use_tqdm)
        for out, text in zip(outputs, prompts):
            out.prompt = text
        return outputs

    def stats(self) -> dict:
        return self.engine.stats()


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, SequenceABC) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # a single token-id list
    if isinstance(prompts, SequenceABC):
        return list(prompts)
    raise TypeError(f"prompts must be str, list[str], list[int] or list[list[int]], got {type(prompts).__name__}")
