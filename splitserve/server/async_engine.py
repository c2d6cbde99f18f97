"""AsyncLLM: one thread owns the engine and steps it; asyncio callers get a stream of deltas per request.

The engine is not thread-safe, so only the engine thread touches it: requests, aborts and stats
queries reach it through a command queue, and results come back as immutable `Delta`s pushed onto each
request's asyncio queue with `call_soon_threadsafe`. A request joins the running batch at the next step.
After each step the thread hands the engine's few gauges (CoreGauges) to `on_step`; the full stats()
walk runs only when someone asks (/stats).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from splitserve.engine.messages import CoreDiedError, CoreGauges
from splitserve.engine.request_state import RequestState
from splitserve.outputs import Logprob

logger = logging.getLogger("splitserve")


@dataclass(frozen=True)
class Delta:
    """What one engine step added to one request."""
    text: str  # new text (held back while it could still turn into a stop string)
    token_ids: list[int]  # new token ids
    logprobs: list[dict[int, Logprob]] | None  # one entry per new token, when requested
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_output_tokens: int  # so far
    num_cached_tokens: int
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # once, with the first token, when requested
    error: str | None = None  # the core refused the request (it ends here, with no tokens)


class EngineDeadError(RuntimeError):
    pass


class RequestRefusedError(ValueError):
    """The core refused a request it had taken (its grammar did not compile in time): `generate` raises it."""


class _Stream:
    def __init__(self, seq: RequestState, loop: asyncio.AbstractEventLoop):
        self.seq = seq
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sent_chars = 0
        self.sent_tokens = 0
        self.sent_prompt_logprobs = False
        stops = seq.sampling_params.stop_list
        self.holdback = max((len(s) for s in stops), default=1) - 1

    def push(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLM:
    """`engine` is an LLMEngine (the front end, over an in-process core or the PD pair)."""

    def __init__(self, engine, on_step: Callable[[CoreGauges], None] | None = None,
                 on_finish: Callable[[RequestState], None] | None = None):
        self.engine = engine
        self.on_step = on_step  # called on the engine thread with the engine's gauges after each step
        self.on_finish = on_finish  # called on the engine thread when a request ends (any reason)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._thread = threading.Thread(target=self._run, name="splitserve-engine", daemon=True)
        self.dead: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._commands.put(("stop", None))
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        """False once the engine thread has died, or its core has (seen at once, even while no request runs)."""
        return self._thread.is_alive() and self.dead is None and self.engine.core.alive()

    # ---- asyncio side ----
    def make_requests(self, prompt, params, request_id: str | None = None) -> list[RequestState]:
        """Tokenize and validate (raises ValueError/TypeError naming the problem): the request's n completions,
        to be run with `generate`, each, in their order. Safe from any thread."""
        return self.engine.make_requests(prompt, params, request_id)

    async def stats(self) -> dict:
        """The engine's full stats, taken on the engine thread between steps."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        future = asyncio.get_running_loop().create_future()
        self._commands.put(("stats", future))
        return await future

    async def generate(self, seq: RequestState) -> AsyncIterator[Delta]:
        """Run one validated request; yields its deltas. Leaving early (client gone) aborts it."""
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running: {self.dead!r}")
        stream = _Stream(seq, asyncio.get_running_loop())
        self._commands.put(("add", stream))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    raise RequestRefusedError(item.error)
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._commands.put(("abort", seq.request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # ---- engine thread ----
    def _run(self) -> None:
        engine = self.engine
        try:
            if self.on_step is not None:
                self.on_step(engine.gauges())
            while True:
                busy = engine.has_unfinished_requests()
                try:  # block only when there is nothing to step
                    cmd = self._commands.get(block=not busy)
                except queue.Empty:
                    cmd = None
                cmd_seen = cmd is not None
                while cmd is not None:
                    if cmd[0] == "stop":
                        self._fail_all(EngineDeadError("the server is shutting down"))
                        return
                    self._handle(cmd)
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        cmd = None
                stepped = engine.has_unfinished_requests()
                if stepped:
                    self._step()
                if self.on_step is not None and (stepped or busy or cmd_seen):
                    self.on_step(engine.gauges())
        except BaseException as e:  # noqa: BLE001 - reported to every waiting client and to /health
            logger.exception("engine thread died")
            self.dead = e
            self._fail_all(EngineDeadError(f"engine failed: {type(e).__name__}: {e}"))
            if self.on_step is not None:  # nothing runs or waits any more
                self.on_step(dataclasses.replace(engine.gauges(), running=0, waiting=0))

    def _handle(self, cmd) -> None:
        kind, arg = cmd
        if kind == "add":
            stream: _Stream = arg
            try:
                self.engine.add(stream.seq)
            except (ValueError, TypeError) as e:
                stream.push(e)
                return
            except BaseException as e:  # the engine cannot take requests any more: this one learns it too
                stream.push(EngineDeadError(f"engine failed: {type(e).__name__}: {e}"))
                raise
            self._streams[stream.seq.request_id] = stream
        elif kind == "stats":
            future: asyncio.Future = arg
            try:
                stats = self.engine.stats()
            except Exception as e:  # the asker gets the error; a dead core takes the engine down after that
                future.get_loop().call_soon_threadsafe(_reject, future, EngineDeadError(f"stats failed: {e}"))
                if isinstance(e, CoreDiedError):
                    raise
                logger.exception("stats failed")
                return
            future.get_loop().call_soon_threadsafe(_resolve, future, stats)
        elif kind == "abort":
            stream = self._streams.pop(arg, None)
            if stream is not None:
                self.engine.abort(arg)
                self._end(stream)

    def _step(self) -> None:
        try:
            updated = self.engine.step()
        except CoreDiedError:
            raise  # no later step can run: the engine is dead (_run fails every request and /health)
        except Exception as e:
            # One bad step must not take the server down: fail the requests in flight, keep serving.
            logger.exception("engine step failed; aborting the requests in flight")
            self._fail_all(RuntimeError(f"engine step failed: {type(e).__name__}: {e}"), drain=False)
            return
        for seq in updated:
            stream = self._streams.get(seq.request_id)
            if stream is None:
                continue
            stream.push(self._delta(stream))
            if seq.is_finished:
                del self._streams[seq.request_id]
                self._end(stream)

    def _delta(self, stream: _Stream) -> Delta:
        seq = stream.seq
        done = seq.is_finished
        end = len(seq.output_text) if done else max(stream.sent_chars, len(seq.output_text) - stream.holdback)
        text = seq.output_text[stream.sent_chars:end]
        stream.sent_chars = end
        new_ids = seq.output_token_ids[stream.sent_tokens:]
        logprobs = None if seq.logprobs is None else seq.logprobs[stream.sent_tokens:]
        stream.sent_tokens += len(new_ids)
        prompt_logprobs = None
        if seq.prompt_logprobs is not None and not stream.sent_prompt_logprobs:
            prompt_logprobs, stream.sent_prompt_logprobs = seq.prompt_logprobs, True
        return Delta(text, new_ids, logprobs, seq.finish_reason, seq.stop_reason, seq.num_prompt_tokens,
                     seq.num_output_tokens, seq.num_cached_tokens, prompt_logprobs, seq.error)

    def _end(self, stream: _Stream) -> None:
        self.engine.release(stream.seq)
        if self.on_finish is not None:
            self.on_finish(stream.seq)

    def _fail_all(self, error: BaseException, drain: bool = True) -> None:
        """Fail every request in flight; with `drain`, also those still queued (the engine is going away)."""
        for rid, stream in list(self._streams.items()):
            self.engine.abort(rid)
            self._end(stream)
            stream.push(error)
        self._streams.clear()
        while drain:  # requests that were queued but never added
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                arg.push(error)
            elif kind == "stats":
                arg.get_loop().call_soon_threadsafe(_reject, arg, error)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
