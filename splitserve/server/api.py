"""OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (SSE streaming), /v1/models,
/health, /metrics, /stats. FastAPI routes translate HTTP ⇄ engine requests; AsyncLLM does the rest."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from splitserve.engine.engine import PromptTooLongError
from splitserve.server.async_engine import AsyncLLM, Delta, EngineDeadError
from splitserve.server.metrics import ServerMetrics
from splitserve.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body

logger = logging.getLogger("splitserve")
_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/stats"}


class _Guard:
    """ASGI middleware: checks the API key (every path but /health) and counts requests by status."""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_counting(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"] != "/health" and not self._authorized(scope):
                body = error_body("Incorrect API key provided.", code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send_counting)
            else:
                await self.app(scope, receive, send_counting)
        finally:
            path = scope["path"] if scope["path"] in _ENDPOINTS else "other"
            self.metrics.http_requests.labels(path, str(status["code"])).inc()

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        return secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0

    def add(self, d: Delta) -> None:
        self.text.append(d.text)
        self.token_ids += d.token_ids
        self.logprobs += d.logprobs or []
        self.finish_reason = d.finish_reason
        self.num_prompt_tokens = d.num_prompt_tokens


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
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


class OpenAIServer:
    def __init__(self, llm: AsyncLLM, model_name: str, metrics: ServerMetrics):
        self.llm, self.model_name, self.metrics = llm, model_name, metrics
        self.tokenizer = llm.engine.tokenizer
        self.max_model_len = llm.engine.max_model_len

    # ---- helpers ----
    def check_model(self, model: str | None) -> None:
        if not self.llm.is_running:  # before any stream opens: a dead engine is a 503, not a 200 with an error
            raise EngineDeadError(f"the engine is not running: {self.llm.dead!r}")
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server serves `{self.model_name}`).",
                           param="model", code="model_not_found")

    def make_sequence(self, prompt, params, request_id: str):
        try:
            return self.llm.make_request(prompt, params, request_id)
        except PromptTooLongError as e:
            raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="prompt") from None

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

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def completion_logprobs(self, choice_logprobs: list[dict[int, float]], token_ids: list[int],
                            offset: int) -> dict:
        tokens = [self.token_str(t) for t in token_ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp[t] for lp, t in zip(choice_logprobs, token_ids)],
                "top_logprobs": [{self.token_str(k): v for k, v in lp.items()} for lp in choice_logprobs],
                "text_offset": offsets}

    def chat_logprobs(self, choice_logprobs: list[dict[int, float]], token_ids: list[int], top: int) -> dict:
        def entry(t: int, v: float) -> dict:
            s = self.token_str(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode())}

        content = []
        for lp, t in zip(choice_logprobs, token_ids):
            others = sorted(lp.items(), key=lambda kv: -kv[1])[:top]
            content.append({**entry(t, lp[t]), "top_logprobs": [entry(k, v) for k, v in others]})
        return {"content": content}

    # ---- endpoints ----
    async def completions(self, body: CompletionRequest, request: Request):
        self.check_model(body.model)
        params = body.sampling_params(16 if body.max_tokens is None else body.max_tokens, body.logprobs)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        seqs = [self.make_sequence(p, params, f"{request_id}-{i}") for i, p in enumerate(body.prompts())]
        gens = [self.llm.generate(s) for s in seqs]
        base = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        want_logprobs = body.logprobs is not None
        if body.stream:
            return self.stream(self._completion_chunks(base, gens, want_logprobs, body))
        choices = await self.collect(request, gens)
        return {**base, "choices": [
            {"index": i, "text": "".join(c.text), "finish_reason": c.finish_reason,
             "logprobs": self.completion_logprobs(c.logprobs, c.token_ids, 0) if want_logprobs else None}
            for i, c in enumerate(choices)],
            "usage": _usage(sum(c.num_prompt_tokens for c in choices), sum(len(c.token_ids) for c in choices))}

    async def _completion_chunks(self, base, gens, want_logprobs: bool, body: CompletionRequest):
        usage = body.stream_options is not None and body.stream_options.include_usage
        prompt_tokens, completion_tokens, offsets = {}, {}, [0] * len(gens)
        async for i, d in _merge(gens):
            prompt_tokens[i], completion_tokens[i] = d.num_prompt_tokens, d.num_output_tokens
            if not (d.text or d.finish_reason):
                continue
            lp = self.completion_logprobs(d.logprobs, d.token_ids, offsets[i]) if want_logprobs else None
            offsets[i] += len(d.text)
            chunk = {**base, "choices": [{"index": i, "text": d.text, "logprobs": lp,
                                          "finish_reason": d.finish_reason}]}
            yield {**chunk, "usage": None} if usage else chunk
        if usage:
            yield {**base, "choices": [], "usage": _usage(sum(prompt_tokens.values()),
                                                          sum(completion_tokens.values()))}

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self.check_model(body.model)
        messages = [m.as_template_message() for m in body.messages]
        try:
            _, prompt_ids = self.llm.engine.chat_prompt(messages, body.add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, self.max_model_len - len(prompt_ids))
        top = body.engine_logprobs()
        seq = self.make_sequence(prompt_ids, body.sampling_params(max_tokens, top),
                                 f"chatcmpl-{uuid.uuid4().hex}")
        gens = [self.llm.generate(seq)]
        base = {"id": seq.request_id, "created": int(time.time()), "model": self.model_name}
        if body.stream:
            return self.stream(self._chat_chunks(base, gens, top, body))
        c = (await self.collect(request, gens))[0]
        message = {"role": "assistant", "content": "".join(c.text)}
        return {**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": message, "finish_reason": c.finish_reason,
             "logprobs": self.chat_logprobs(c.logprobs, c.token_ids, top) if top is not None else None}],
            "usage": _usage(c.num_prompt_tokens, len(c.token_ids))}

    async def _chat_chunks(self, base, gens, top: int | None, body: ChatCompletionRequest):
        usage = body.stream_options is not None and body.stream_options.include_usage
        base = {**base, "object": "chat.completion.chunk"}

        def chunk(delta: dict, finish_reason=None, logprobs=None) -> dict:
            c = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                      "finish_reason": finish_reason}]}
            return {**c, "usage": None} if usage else c

        yield chunk({"role": "assistant", "content": ""})
        last = None
        async for _, d in _merge(gens):
            last = d
            if d.text or d.finish_reason:
                lp = self.chat_logprobs(d.logprobs, d.token_ids, top) if top is not None else None
                yield chunk({"content": d.text} if d.text else {}, d.finish_reason, lp)
        if usage and last is not None:
            yield {**base, "choices": [], "usage": _usage(last.num_prompt_tokens, last.num_output_tokens)}

    def stream(self, chunks) -> StreamingResponse:
        async def sse():
            try:
                async for obj in chunks:
                    yield _sse(obj)
            except (APIError, EngineDeadError, RuntimeError, ValueError) as e:
                # Headers are gone already: report the error in-stream, as OpenAI does.
                yield _sse(error_body(str(e), "server_error"))
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                             "owned_by": "splitserve", "max_model_len": self.max_model_len}]}


def build_app(llm: AsyncLLM, model_name: str, api_key: str | None = None,
              metrics: ServerMetrics | None = None) -> FastAPI:
    metrics = metrics or ServerMetrics(model_name)
    llm.on_step = metrics.on_step
    llm.on_finish = metrics.on_finish
    server = OpenAIServer(llm, model_name, metrics)

    @asynccontextmanager
    async def lifespan(app):
        llm.start()
        yield
        llm.shutdown()
        llm.engine.shutdown()  # PD worker processes

    app = FastAPI(title="splitserve", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        problems = []
        for err in e.errors():
            if err.get("type") == "json_invalid":
                problems.append(f"malformed JSON body ({err.get('ctx', {}).get('error', 'cannot parse')})")
                continue
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            problems.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        param = next((str(err["loc"][1]) for err in e.errors() if len(err.get("loc", ())) > 1), None)
        return JSONResponse(error_body("invalid request: " + "; ".join(problems), param=param), status_code=400)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, e: EngineDeadError):
        return JSONResponse(error_body(str(e), "server_error"), status_code=503)

    @app.exception_handler(RuntimeError)
    async def engine_error(request: Request, e: RuntimeError):
        return JSONResponse(error_body(str(e), "server_error"), status_code=500)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await server.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await server.chat_completions(body, request)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/health")
    async def health():
        if not llm.is_running:
            return JSONResponse({"status": "dead", "error": repr(llm.dead)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/stats")
    async def stats():
        return await llm.stats()

    app.add_middleware(_Guard, api_key=api_key, metrics=metrics)
    return app


def serve(model: str | None, engine_args: dict, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, served_model_name: str | None = None, log_level: str = "info") -> None:
    import os

    import uvicorn

    from splitserve.config import EngineConfig
    from splitserve.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_args))
    name = served_model_name or (os.path.basename(os.path.normpath(model)) if model else "SmolLM2-135M-Instruct")
    app = build_app(AsyncLLM(engine), name, api_key)
    logger.info("serving %s on http://%s:%d", name, host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
