"""OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (SSE streaming), /v1/models,
/v1/models/{id}, /health, /metrics, /stats, and vLLM's /version, /tokenize, /detokenize. FastAPI routes
translate HTTP ⇄ engine requests; AsyncLLM does the rest.

One client must not be able to hurt another (README "Security"): bodies are capped before they are read,
sampling values are validated before they reach the engine, tokenizing and templating run off the event
loop, the number of requests in the server is bounded (429 beyond it), and every error, whatever its
origin, is answered in OpenAI's shape without internal detail (that goes to the log, under an error id).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from splitserve.engine.engine import PromptTooLongError
from splitserve.engine.gc_heap import freeze_startup_heap
from splitserve.engine.request_state import RequestState
from splitserve.engine.structured_output import GrammarError
from splitserve.outputs import Logprob
from splitserve.sampling_params import SamplingParams
from splitserve.server.async_engine import AsyncLLM, Delta, EngineDeadError, RequestRefusedError
from splitserve.server.metrics import ServerMetrics
from splitserve.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)

logger = logging.getLogger("splitserve")
_MODEL_PATH = "/v1/models/{model_id}"  # one metrics label for every id asked for (no label per id)
_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", _MODEL_PATH, "/health", "/metrics", "/stats",
              "/version", "/tokenize", "/detokenize"}
_GENERATE = {"/v1/completions", "/v1/chat/completions"}
DEFAULT_MAX_BODY_BYTES = 4 << 20  # a full 128k-token prompt as JSON token ids is ~1 MB; text is smaller
DEFAULT_MAX_WAITING_REQUESTS = 1024
_ADMITTED = "splitserve.admitted"  # scope key: [places this HTTP request holds], given back by _Guard
# Text above this many characters takes tens of ms or more to tokenize (4 MiB: ~7 s on one core); such
# requests take turns in a lane of their own, so that a flood of them cannot occupy every worker thread
# while short requests wait behind them.
_HEAVY_CHARS = 32 << 10
T = TypeVar("T")


def _log_error(what: str, e: BaseException | None = None) -> str:
    """Log the detail under a fresh id; the client gets `what` and the id, never the exception text."""
    error_id = uuid.uuid4().hex[:12]
    logger.error("%s (error id %s)", what, error_id, exc_info=e)
    return f"{what} (error id {error_id}; the detail is in the server log)"


async def _off_loop(fn: Callable[..., T], *args) -> T:
    """Run CPU-heavy request preparation (tokenizing, chat templates: seconds for a long prompt) in a worker
    thread, so that the event loop keeps serving every other client meanwhile."""
    return await asyncio.to_thread(fn, *args)


_PARAM_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))  # to name a 400's param


class _Admission:
    """Prompts admitted and not yet answered (being tokenized, queued or generated). Beyond `limit` a request
    is answered 429 at once, so overload is pushed back to clients instead of queueing without bound.

    A request is admitted once its body has been read and validated, not when it arrives: a peer that
    sends its body slowly (or never) must not hold a place that real requests need."""

    def __init__(self, limit: int):
        self.limit, self.open = limit, 0

    def take(self, n: int) -> bool:
        if self.open + n > self.limit:
            return False
        self.open += n
        return True

    def give(self, n: int) -> None:
        self.open -= n


class _Guard:
    """ASGI middleware: checks the API key (every path but /health), caps the body size (413), gives back the
    places a generation request was admitted to (OpenAIServer.admit) once its response has been sent or has
    failed, whatever happened, and counts requests by status."""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics, max_body_bytes: int,
                 admission: _Admission):
        self.app, self.metrics, self.max_body_bytes, self.admission = app, metrics, max_body_bytes, admission
        self.expected_auth = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}
        admitted = [0]

        async def send_counting(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def answer(code: int, body: dict, headers: dict | None = None) -> None:
            await JSONResponse(body, status_code=code, headers=headers)(scope, receive, send_counting)

        try:
            headers = dict(scope["headers"])
            if self.expected_auth and scope["path"] != "/health" and not self._authorized(headers):
                return await answer(401, error_body("Incorrect API key provided.", code="invalid_api_key"))
            length = headers.get(b"content-length")
            too_big = length is not None and (not length.isdigit() or int(length) > self.max_body_bytes)
            if length is None and b"transfer-encoding" in headers:  # chunked: no length to check up front
                receive, too_big = await self._read_capped(receive)
            if too_big:
                # Read on (discarding, bounded in bytes and time) so a plain client that is still sending
                # gets to read the answer: closing on it mid-body turns the 413 into a connection reset.
                await _drain(receive, DRAIN_MAX_BYTES, DRAIN_MAX_S)
                return await answer(413, error_body(
                    f"request body too large: the limit is {self.max_body_bytes} bytes (--max-request-body-bytes)",
                    code="request_too_large"), {"Connection": "close"})
            if scope["path"] in _GENERATE:
                scope[_ADMITTED] = admitted
            await self.app(scope, receive, send_counting)
        finally:
            self.admission.give(admitted[0])
            path = _MODEL_PATH if scope["path"].startswith("/v1/models/") else scope["path"]
            path = path if path in _ENDPOINTS else "other"
            self.metrics.http_requests.labels(path, str(status["code"])).inc()

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        # Bytes against bytes: the header's raw bytes (a non-ASCII key arrives UTF-8 encoded) and the key's UTF-8.
        return secrets.compare_digest(headers.get(b"authorization", b""), self.expected_auth)

    async def _read_capped(self, receive):
        """Read a chunked body, counting bytes as they arrive; returns (a receive that replays it, too_big)."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return receive, True
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return replay, False


DRAIN_MAX_BYTES = 64 * 2**20  # of an oversized body, read and dropped before the 413 (then: close)
DRAIN_MAX_S = 2.0


async def _drain(receive, max_bytes: int, max_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline, size = loop.time() + max_s, 0
    while size <= max_bytes:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return
        size += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    def add(self, d: Delta) -> None:
        self.text.append(d.text)
        self.token_ids += d.token_ids
        self.logprobs += d.logprobs or []
        self.finish_reason = d.finish_reason
        self.num_prompt_tokens = d.num_prompt_tokens
        self.prompt_logprobs = d.prompt_logprobs or self.prompt_logprobs


def _prompt_logprobs_json(entries: list[dict[int, Logprob] | None] | None) -> list | None:
    """vLLM's shape: per prompt token, None (the first) or {token id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [None if e is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                                    for t, lp in e.items()} for e in entries]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _merge(gens: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave several requests' deltas; leaving early cancels (and so aborts) all of them."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[Delta]) -> None:
        try:
            async for d in gen:
                q.put_nowait((i, d))
            q.put_nowait((i, None))
        except Exception as e:
            q.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, RequestRefusedError):  # the client's doing (a grammar too costly): a 400
                raise APIError(400, f"the request was refused: {item}")
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _byte_chars() -> list[str]:
    """GPT-2's byte -> character table (the ByteLevel pre-tokenizer's alphabet), indexed by byte."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


@dataclass(frozen=True)
class _TokenBound:
    """A lower bound on a text's token count that costs no tokenizing: ceil(N / max_chars), N counting the
    characters the tokenizer does not drop.

    It holds for byte-level BPE (GPT-2, SmolLM, Llama 3, ...) with no normalizer, no text-removing split and
    no whitespace-stripping added token: a token's vocabulary string has one character per byte it covers
    (an added token: its literal text), and a byte belongs to one character, so a token touches at most
    max_chars characters. A byte missing from the vocabulary is dropped when there is no unknown token
    (SmolLM2 lacks six ASCII control bytes): such ASCII characters yield no token and are not counted."""
    max_chars: int
    dropped: str  # characters that make no token

    @classmethod
    def of(cls, tokenizer) -> _TokenBound | None:
        """None where the tokenizer promises no bound: a normalizer may shrink text (NFC composes characters),
        unknown-token, removing or stripping rules may swallow any amount of it (the body cap still bounds
        the work of those)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        try:
            cfg = json.loads(backend.to_str())
            vocab = tokenizer.get_vocab()
            pre = json.dumps(cfg.get("pre_tokenizer")).lower()
            if (cfg.get("normalizer") is not None or (cfg.get("model") or {}).get("type") != "BPE"
                    or "bytelevel" not in pre or "removed" in pre
                    or any(t.get("lstrip") or t.get("rstrip") for t in cfg.get("added_tokens") or [])):
                return None
            missing = [b for b, c in enumerate(_byte_chars()) if c not in vocab]
            # Every non-ASCII character has continuation bytes: with those all present, it makes a token even
            # if its lead byte is missing (SmolLM2 lacks F1, F2: unassigned planes). Else, no simple bound.
            if any(0x80 <= b <= 0xBF for b in missing):
                return None
            return cls(max(map(len, vocab)), "".join(chr(b) for b in missing if b < 0x80))
        except Exception:  # noqa: BLE001 - an unusual tokenizer only loses the shortcut
            return None

    def min_tokens(self, text: str) -> int:
        counted = len(text) - sum(text.count(c) for c in self.dropped)
        return -(-counted // self.max_chars)


class OpenAIServer:
    def __init__(self, llm: AsyncLLM, model_name: str, metrics: ServerMetrics,
                 admission: _Admission | None = None):
        self.llm, self.model_name, self.metrics = llm, model_name, metrics
        self.admission = admission or _Admission(DEFAULT_MAX_WAITING_REQUESTS)
        self.tokenizer = llm.engine.tokenizer
        self.max_model_len = llm.engine.max_model_len
        self.token_bound = _TokenBound.of(self.tokenizer) if self.tokenizer is not None else None
        self.heavy_lane = asyncio.Semaphore(1)
        self.created = int(time.time())  # the model objects' `created`: when this server started

    def lane(self, texts: list) -> contextlib.AbstractAsyncContextManager:
        """The heavy lane for requests with a lot of text to tokenize; none for the others."""
        heavy = sum(len(t) for t in texts if isinstance(t, str)) > _HEAVY_CHARS
        return self.heavy_lane if heavy else contextlib.nullcontext()

    # ---- helpers ----
    def check_model(self, model: str | None) -> None:
        if not self.llm.is_running:  # before any stream opens: a dead engine is a 503, not a 200 with an error
            raise EngineDeadError("the engine is not running")
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server serves `{self.model_name}`).",
                           param="model", code="model_not_found")

    def admit(self, request: Request, n: int) -> None:
        """Take `n` places (one per sequence: prompts × n) for this request, or answer 429; _Guard gives them
        back."""
        limit = self.admission.limit
        if n > limit:  # could never be admitted: not worth a retry
            raise APIError(400, f"this request has {n} sequences (prompts × n) but the server admits at most "
                                f"{limit} at once (--max-waiting-requests)", param="prompt")
        if not self.admission.take(n):
            raise APIError(429, f"the server is at its limit of {limit} requests in flight "
                                "(--max-waiting-requests); retry later", "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        request.scope[_ADMITTED][0] += n

    def check_prompt_size(self, prompt) -> None:
        """Reject, before tokenizing it, a prompt that cannot fit the context."""
        m = self.max_model_len
        if isinstance(prompt, list) and len(prompt) >= m:
            raise APIError(400, f"prompt has {len(prompt)} tokens but max_model_len is {m} (the prompt must "
                                "leave room for one new token)", param="prompt", code="context_length_exceeded")
        if isinstance(prompt, str) and self.token_bound is not None:
            at_least = self.token_bound.min_tokens(prompt)
            if at_least >= m:
                raise APIError(400, f"prompt has {len(prompt)} characters, so at least {at_least} tokens (a token "
                                    f"of this model stands for at most {self.token_bound.max_chars} characters), "
                                    f"but max_model_len is {m}", param="prompt", code="context_length_exceeded")

    def check_max_tokens(self, max_tokens: int, num_prompt_tokens: int, param: str = "max_tokens") -> None:
        room = self.max_model_len - num_prompt_tokens
        if max_tokens > room:
            raise APIError(400, f"{param} is too large: {max_tokens}. This model's maximum context length is "
                                f"{self.max_model_len} tokens and your request has {num_prompt_tokens} input "
                                f"tokens ({max_tokens} > {self.max_model_len} - {num_prompt_tokens}).", param=param)

    def make_requests(self, prompt, params, request_id: str, structured_field: str = "response_format"
                      ) -> list[RequestState]:
        """Tokenize and validate one prompt: its n completions (blocking: call it through _off_loop).
        `structured_field`: the body field a bad schema / regex / grammar came from."""
        try:
            return self.llm.make_requests(prompt, params, request_id)
        except PromptTooLongError as e:
            raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None
        except GrammarError as e:
            raise APIError(400, str(e), param=structured_field) from None
        except (ValueError, TypeError) as e:  # the engine's messages start with the field they are about
            word = str(e).split(" ")[0]
            raise APIError(400, str(e), param=word if word in _PARAM_FIELDS else "prompt") from None

    def make_all(self, prompts: list, params: SamplingParams, request_ids: list[str],
                 structured_field: str = "response_format") -> list[RequestState]:
        """Every prompt's completions, in choice order (prompt-major, as OpenAI's `index`)."""
        return [c for p, rid in zip(prompts, request_ids)
                for c in self.make_requests(p, params, rid, structured_field)]

    async def collect(self, request: Request, gens) -> list[_Choice]:
        """Run requests to the end; if the client goes away meanwhile, abort them."""
        choices = [_Choice() for _ in gens]

        async def run():
            async for i, d in _merge(gens):
                choices[i].add(d)

        task = asyncio.create_task(run())
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                task.result()
                return choices
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected")

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[int]]:
        """Render and tokenize (blocking: call it through _off_loop)."""
        try:
            return self.llm.engine.chat_prompt(messages, add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def completion_logprobs(self, choice_logprobs: list[dict[int, Logprob]], token_ids: list[int],
                            offset: int) -> dict:
        tokens = [self.token_str(t) for t in token_ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp[t].logprob for lp, t in zip(choice_logprobs, token_ids)],
                "top_logprobs": [{self.token_str(k): v.logprob for k, v in lp.items()} for lp in choice_logprobs],
                "text_offset": offsets}

    def chat_logprobs(self, choice_logprobs: list[dict[int, Logprob]], token_ids: list[int], top: int) -> dict:
        def entry(t: int, v: Logprob) -> dict:
            s = self.token_str(t)
            return {"token": s, "logprob": v.logprob, "bytes": list(s.encode())}

        content = []
        for lp, t in zip(choice_logprobs, token_ids):
            others = sorted(lp.items(), key=lambda kv: kv[1].rank)[:top]
            content.append({**entry(t, lp[t]), "top_logprobs": [entry(k, v) for k, v in others]})
        return {"content": content}

    # ---- endpoints ----
    async def completions(self, body: CompletionRequest, request: Request):
        self.check_model(body.model)
        # Omitted (or null): OpenAI's 16, cut short by the context's end if need be; given: must fit it.
        explicit = body.max_tokens is not None
        params = body.sampling_params(body.max_tokens if explicit else 16, body.logprobs)
        prompts = body.prompts()
        self.admit(request, len(prompts) * body.n)
        for p in prompts:
            self.check_prompt_size(p)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        async with self.lane(prompts):
            seqs = await _off_loop(self.make_all, prompts, params, ids, body.structured_field())
        if explicit:
            for s in seqs:
                self.check_max_tokens(params.max_tokens, s.num_prompt_tokens)
        gens = [self.llm.generate(s) for s in seqs]
        base = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        want_logprobs = body.logprobs is not None
        if body.stream:
            return self.stream(self._completion_chunks(base, gens, want_logprobs, body))
        choices = await self.collect(request, gens)
        return {**base, "choices": [
            {"index": i, "text": "".join(c.text), "finish_reason": c.finish_reason,
             "logprobs": self.completion_logprobs(c.logprobs, c.token_ids, 0) if want_logprobs else None,
             **({"prompt_logprobs": _prompt_logprobs_json(c.prompt_logprobs)} if body.prompt_logprobs is not None
                else {})}
            for i, c in enumerate(choices)],
            "usage": _usage(sum(c.num_prompt_tokens for c in choices[::body.n]),  # a prompt counts once
                            sum(len(c.token_ids) for c in choices))}

    async def _completion_chunks(self, base, gens, want_logprobs: bool, body: CompletionRequest):
        usage = body.stream_options is not None and body.stream_options.include_usage
        prompt_tokens, completion_tokens, offsets = {}, {}, [0] * len(gens)
        async for i, d in _merge(gens):
            if i % body.n == 0:  # a prompt counts once
                prompt_tokens[i] = d.num_prompt_tokens
            completion_tokens[i] = d.num_output_tokens
            if not (d.text or d.finish_reason or d.prompt_logprobs):
                continue
            lp = self.completion_logprobs(d.logprobs, d.token_ids, offsets[i]) if want_logprobs else None
            offsets[i] += len(d.text)
            choice = {"index": i, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}
            if d.prompt_logprobs is not None:
                choice["prompt_logprobs"] = _prompt_logprobs_json(d.prompt_logprobs)
            chunk = {**base, "choices": [choice]}
            yield {**chunk, "usage": None} if usage else chunk
        if usage:
            yield {**base, "choices": [], "usage": _usage(sum(prompt_tokens.values()),
                                                          sum(completion_tokens.values()))}

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self.check_model(body.model)
        # Same rule as completions (0 is a 400), but omitted means "to the end of the context", as OpenAI's chat.
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if requested is not None and requested < 1:
            raise APIError(400, f"{param} must be an integer >= 1, got {requested}", param=param)
        top = body.engine_logprobs()
        # validated before templating (omitted max_tokens: at least min_tokens, the real room is set below)
        params = body.sampling_params(max(1, body.min_tokens) if requested is None else requested, top)
        self.admit(request, 1)
        messages = [m.as_template_message() for m in body.messages]
        async with self.lane([m["content"] for m in messages]):
            _, prompt_ids = await _off_loop(self.chat_prompt, messages, body.add_generation_prompt)
        room = self.max_model_len - len(prompt_ids)
        if room > 0:  # else make_request below says the prompt is too long
            if requested is None:
                if room < params.min_tokens:
                    raise APIError(400, f"min_tokens is too large: {params.min_tokens}. This model's maximum context "
                                        f"length is {self.max_model_len} tokens and your request has "
                                        f"{len(prompt_ids)} input tokens.", param="min_tokens")
                params = dataclasses.replace(params, max_tokens=room)
            else:
                self.check_max_tokens(requested, len(prompt_ids), param)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        seqs = await _off_loop(self.make_requests, prompt_ids, params, request_id, body.structured_field())
        gens = [self.llm.generate(s) for s in seqs]
        base = {"id": request_id, "created": int(time.time()), "model": self.model_name}
        if body.stream:
            return self.stream(self._chat_chunks(base, gens, top, body))
        choices = await self.collect(request, gens)
        prompt_logprobs = ({"prompt_logprobs": _prompt_logprobs_json(choices[0].prompt_logprobs)}
                           if body.prompt_logprobs is not None else {})
        return {**base, "object": "chat.completion", "choices": [
            {"index": i, "message": {"role": "assistant", "content": "".join(c.text)}, "finish_reason": c.finish_reason,
             "logprobs": self.chat_logprobs(c.logprobs, c.token_ids, top) if top is not None else None}
            for i, c in enumerate(choices)], **prompt_logprobs,
            "usage": _usage(choices[0].num_prompt_tokens, sum(len(c.token_ids) for c in choices))}

    async def _chat_chunks(self, base, gens, top: int | None, body: ChatCompletionRequest):
        usage = body.stream_options is not None and body.stream_options.include_usage
        base = {**base, "object": "chat.completion.chunk"}

        def chunk(index: int, delta: dict, finish_reason=None, logprobs=None, **extra) -> dict:
            c = {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                      "finish_reason": finish_reason}], **extra}
            return {**c, "usage": None} if usage else c

        for i in range(len(gens)):
            yield chunk(i, {"role": "assistant", "content": ""})
        prompt_tokens, completion_tokens = 0, [0] * len(gens)
        async for i, d in _merge(gens):
            prompt_tokens, completion_tokens[i] = d.num_prompt_tokens, d.num_output_tokens
            extra = {"prompt_logprobs": _prompt_logprobs_json(d.prompt_logprobs)} if d.prompt_logprobs else {}
            if d.text or d.finish_reason or extra:
                lp = self.chat_logprobs(d.logprobs, d.token_ids, top) if top is not None else None
                yield chunk(i, {"content": d.text} if d.text else {}, d.finish_reason, lp, **extra)
        if usage:
            yield {**base, "choices": [], "usage": _usage(prompt_tokens, sum(completion_tokens))}

    def stream(self, chunks) -> StreamingResponse:
        async def sse():
            try:
                async for obj in chunks:
                    yield _sse(obj)
            except APIError as e:  # headers are gone already: report the error in-stream, as OpenAI does
                yield _sse(e.body())
            except Exception as e:  # noqa: BLE001 - whatever it is, the client gets a stable message and an id
                yield _sse(error_body(_log_error("the request failed inside the engine", e), "server_error"))
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "splitserve",
                "max_model_len": self.max_model_len}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model(self, model_id: str) -> dict:
        if model_id != self.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist (this server serves `{self.model_name}`).",
                           param="model", code="model_not_found")
        return self.model_card()

    def _tokenizer(self):
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        return self.tokenizer

    async def tokenize(self, body: TokenizeRequest) -> dict:
        """vLLM's /tokenize: the prompt's token ids (a conversation: rendered with the chat template first, and
        add_special_tokens ignored, as the template holds them), tokenized off the event loop."""
        self.check_model(body.model)
        body.check()
        tok = self._tokenizer()
        if body.messages is not None:
            messages = [m.as_template_message() for m in body.messages]
            async with self.lane([m["content"] for m in messages]):
                _, ids = await _off_loop(self.chat_prompt, messages, body.add_generation_prompt)
        else:
            async with self.lane([body.prompt]):
                ids = await _off_loop(lambda: tok.encode(body.prompt, add_special_tokens=body.add_special_tokens))
        return {"tokens": list(ids), "count": len(ids), "max_model_len": self.max_model_len}

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        """vLLM's /detokenize: ids -> text; an id outside the vocabulary is a 400 that names it."""
        self.check_model(body.model)
        tok, vocab = self._tokenizer(), self.llm.engine.vocab_size

        def decode(ids: list[int]) -> str:  # up to MAX_DETOKENIZE_TOKENS ids: checked and decoded off the loop
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token ids outside the vocabulary [0, {vocab}): {bad[:5]}"
                                    + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""), param="tokens")
            return tok.decode(ids)

        return {"prompt": await _off_loop(decode, body.tokens)}


def build_app(llm: AsyncLLM, model_name: str, api_key: str | None = None,
              metrics: ServerMetrics | None = None, max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS) -> FastAPI:
    if max_request_body_bytes < 1 or max_waiting_requests < 1:
        raise ValueError("max_request_body_bytes and max_waiting_requests must be >= 1")
    metrics = metrics or ServerMetrics(model_name)
    llm.on_step = metrics.on_step
    llm.on_finish = metrics.on_finish
    admission = _Admission(max_waiting_requests)
    server = OpenAIServer(llm, model_name, metrics, admission)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        llm.start()
        yield
        llm.shutdown()
        llm.engine.shutdown()  # PD worker processes

    app = FastAPI(title="splitserve", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        problems = []
        for err in errors[:5]:  # the first few say what is wrong; the protocol models keep the list short anyway
            if err.get("type") == "json_invalid":
                problems.append(f"malformed JSON body ({err.get('ctx', {}).get('error', 'cannot parse')})")
                continue
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            if not loc and err.get("type") == "missing":
                problems.append("the body is empty: send a JSON object")
                continue
            problems.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        if len(errors) > 5:
            problems.append(f"and {len(errors) - 5} more")
        param = next((err["loc"][1] for err in errors if len(err.get("loc", ())) > 1
                      and isinstance(err["loc"][1], str)), None)
        return JSONResponse(error_body("invalid request: " + "; ".join(problems), param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        # Starlette's own errors (unknown path, wrong method, a body JSON cannot parse) in OpenAI's shape.
        message = {404: f"Invalid URL ({request.method} {request.url.path})",
                   405: f"Method {request.method} is not allowed for {request.url.path}",
                   400: "could not parse the request body: it must be UTF-8 JSON, not nested deeper than "
                        "Python's recursion limit"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(message), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, e: EngineDeadError):
        # the log gets the engine thread's own exception (the cause), not this report of it
        message = _log_error("the engine is not running", llm.dead or e)
        return JSONResponse(error_body(message, "server_error"), status_code=503)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return JSONResponse(error_body(_log_error("internal server error", e), "server_error"), status_code=500)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await server.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await server.chat_completions(body, request)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        return server.model(model_id)

    @app.get("/version")
    async def version():
        from splitserve import __version__

        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return await server.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return await server.detokenize(body)

    @app.get("/health")
    async def health():
        if not llm.is_running:
            return JSONResponse({"status": "dead"}, status_code=503)  # unauthenticated: the cause is in the log
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/stats")
    async def stats():
        return await llm.stats()

    app.add_middleware(_Guard, api_key=api_key, metrics=metrics, max_body_bytes=max_request_body_bytes,
                       admission=admission)
    return app


def serve(model: str | None, engine_args: dict, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, served_model_name: str | None = None, log_level: str = "info",
          max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS) -> None:
    import os

    import uvicorn

    from splitserve.config import EngineConfig
    from splitserve.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_args))
    name = served_model_name or (os.path.basename(os.path.normpath(model)) if model else "SmolLM2-135M-Instruct")
    app = build_app(AsyncLLM(engine), name, api_key, max_request_body_bytes=max_request_body_bytes,
                    max_waiting_requests=max_waiting_requests)
    freeze_startup_heap()
    logger.info("serving %s on http://%s:%d", name, host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
