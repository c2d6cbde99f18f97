"""OpenAI request bodies (pydantic), their mapping to SamplingParams, and OpenAI-shaped errors.

Unknown fields are rejected (as OpenAI does), and known fields this engine cannot honour (best_of, echo,
tools ...) are a 400 that names them rather than being silently ignored.

Bodies are validated strictly (no "yes" for a bool, no "5" for an int, no NaN/Infinity), and no list is
validated element by element past its first error: a 4 MiB body of a million wrong elements would
otherwise make pydantic build millions of error objects on the event loop (12-18 s measured).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from splitserve.sampling_params import MAX_CHOICES, MAX_LOGPROBS, MAX_N, SamplingParams, StructuredOutputsParams

# Per-request limits (README "Security"); the body size and queue limits are server flags (api.py).
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 256  # characters in one stop string (the stream holds back that many characters)
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024  # entries in logit_bias (SamplingParams checks the same)
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _unicode(text: str) -> str:
    """JSON can carry lone surrogates ("\\ud800"), which no tokenizer takes: name the problem here."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it has a lone surrogate)") from None
    return text


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema."""
    model_config = _STRICT
    name: str = Field(max_length=256)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(BaseModel):
    """vLLM's `structured_outputs` field: one of these, as in StructuredOutputsParams."""
    model_config = _STRICT
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(default=None, max_length=MAX_CHOICES, fail_fast=True)
    grammar: str | None = None
    json_object: bool | None = None


def _or(value, default):
    """A field sent as null takes its default."""
    return default if value is None else value


class _Common(BaseModel):
    """Fields shared by both endpoints (OpenAI's, then vLLM-style extensions)."""
    model_config = _STRICT
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None  # null: the default, as in OpenAI's API and vLLM (also below)
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (JSON keys are strings: "50256") -> bias
    user: str | None = None
    # extensions
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS, fail_fast=True)
    skip_special_tokens: bool = True
    repetition_penalty: float | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # structured outputs: OpenAI's response_format, vLLM's guided_* fields and its structured_outputs object
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(default=None, max_length=MAX_CHOICES, fail_fast=True)
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsBody | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _bounded_stop(cls, v: Any) -> Any:
        stops = [v] if isinstance(v, str) else v if isinstance(v, list) else []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if any(isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        return v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bounded_logit_bias(cls, v: Any) -> Any:  # before its items are validated (a huge dict: one error)
        if isinstance(v, dict) and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries, got {len(v)}")
        return v

    def unsupported(self) -> list[str]:
        return []

    def _structured_given(self) -> dict[str, dict]:
        """The body's structured-output constraints: {field: StructuredOutputsParams kwargs}."""
        given: dict[str, dict] = {}
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            given["response_format"] = {"json_object": True}
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise APIError(400, "response_format of type json_schema needs json_schema.schema",
                               param="response_format")
            given["response_format"] = {"json": rf.json_schema.schema_}
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                given[name] = {key: getattr(self, name)}
        if self.structured_outputs is not None:
            given["structured_outputs"] = self.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        return given

    def structured_field(self) -> str:
        """The body field its structured-output constraint came from: what a 400 about that constraint names."""
        return next(iter(self._structured_given()), "response_format")

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The one structured-output constraint the body asks for (two fields that both constrain: a 400)."""
        given = self._structured_given()
        if len(given) > 1:
            raise APIError(400, f"give at most one structured-output constraint, got {', '.join(given)}",
                           param=list(given)[1])
        if not given:
            return None
        (param, kwargs), = given.items()
        try:
            return StructuredOutputsParams(**kwargs)
        except ValueError as e:
            message = str(e) if str(e).startswith(param) else f"{param}: {e}"
            raise APIError(400, message, param=param) from None

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        bad = self.unsupported()
        if bad:
            raise APIError(400, f"unsupported parameter(s): {', '.join(bad)}", param=bad[0].split(" ")[0])
        structured = self.structured_outputs_params()
        try:
            return SamplingParams(
                temperature=_or(self.temperature, 1.0),
                top_p=_or(self.top_p, 1.0), top_k=_or(self.top_k, -1), min_p=_or(self.min_p, 0.0),
                max_tokens=max_tokens, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos, logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
                presence_penalty=_or(self.presence_penalty, 0.0), frequency_penalty=_or(self.frequency_penalty, 0.0),
                repetition_penalty=_or(self.repetition_penalty, 1.0), min_tokens=self.min_tokens,
                logit_bias=self.logit_bias,
                include_stop_str_in_output=self.include_stop_str_in_output, n=self.n,
                prompt_logprobs=self.prompt_logprobs, structured_outputs=structured)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(" ")[0]) from None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="plain", json_schema_input_type=str | list[int] | list[str] | list[list[int]])
    @classmethod
    def _prompt_shape(cls, v: Any) -> Any:
        """One pass, one error (the declared union would report every element of every branch)."""
        def ids(x) -> bool:
            return isinstance(x, list) and all(type(t) is int for t in x)

        if isinstance(v, str):
            return _unicode(v)
        if ids(v):
            return v
        if isinstance(v, list) and (all(type(x) is str for x in v) or all(ids(x) for x in v)):
            if len(v) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(v)}")
            for x in v:
                if isinstance(x, str):
                    _unicode(x)
            return v
        raise ValueError("must be a string, a list of token ids, a list of strings or a list of token-id lists")

    def prompts(self) -> list:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise APIError(400, "prompt is empty", param="prompt")
        return list(p)

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.echo:
            bad.append("echo")
        if self.best_of not in (None, 1):
            bad.append("best_of")
        if self.suffix:
            bad.append("suffix")
        return bad


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(fail_fast=True)] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        for text in [v] if isinstance(v, str) else [p.text for p in v or []]:
            _unicode(text)
        return v

    def as_template_message(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True

    def engine_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


MAX_DETOKENIZE_TOKENS = 1 << 20  # ids in one /detokenize body (the body cap allows ~2M short ones)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or a chat conversation rendered with the model's template."""
    model_config = _STRICT
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, fail_fast=True)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @field_validator("prompt")
    @classmethod
    def _valid_unicode(cls, v: str | None) -> str | None:
        return v if v is None else _unicode(v)

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")


class DetokenizeRequest(BaseModel):
    model_config = _STRICT
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_TOKENS, fail_fast=True)
