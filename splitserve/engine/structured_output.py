"""Structured outputs (JSON schema, JSON object, regex, choice, EBNF grammar) through xgrammar.

Why xgrammar: its per-token mask fill is 8-20x faster than llguidance's on this project's tokenizers, and
that cost is paid at every decode step (docs/STRUCTURED-OUTPUT.md has the measurement).

- Front end (`check`): parses the schema / regex / grammar without a tokenizer (well under a millisecond)
  and raises ValueError naming the problem, before the request is queued.
- Engine core (`StructuredOutputManager`, vLLM v1's shape): compiles each grammar against the tokenizer in a
  thread pool, off the step loop (the tokenizer is loaded from the model folder on first use, so a PD worker
  needs nothing from the front end); a request is not scheduled until its grammar is ready. Each Sequence
  owns a matcher advanced by each of its accepted tokens; a sequence that arrives with output tokens (the
  PD decode worker) gets a matcher that replays them. Preemption keeps the output tokens and so the matcher.
- Every step with a structured row fills a token bitmask on the host for those rows only, in one call of xgrammar's
  batch fill (its C++ threads) made from one persistent Python thread, while the device runs the forward pass and
  the engine thread runs the front end and schedules the next step; the sampler applies it on the device
  (layers/sampler.py).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from splitserve.sampling_params import StructuredOutputsParams

logger = logging.getLogger("splitserve")

# A grammar whose compile runs longer than this fails its request (the compile thread runs on: C++ code cannot
# be interrupted, hence two threads, so that one hostile schema leaves the other for everyone else).
COMPILE_TIMEOUT_S = 30.0
COMPILE_THREADS = 2
GRAMMAR_CACHE_BYTES = 256 << 20
# C++ threads that fill one step's bitmask: one per CPU this process may run on, at most 8, and one per
# ROWS_PER_FILL_THREAD rows. A batch-64 JSON fill is 2-3 ms of work on one core, 2-50 us a row. xgrammar starts its
# threads anew on every call (its pool cannot be reused after Join): on the 2-core development box a trivial
# grammar's call took 245 us with 2 threads against 84 with 1 (docs/STRUCTURED-OUTPUT.md).
MAX_FILL_THREADS = 8
ROWS_PER_FILL_THREAD = 8
# While a fill runs, the engine thread runs the front end and the scheduler: Python that holds the GIL. The fill's
# Python thread needs the GIL to start the call and to return from it, and CPython passes the GIL on only after the
# switch interval (5 ms by default): the fill waited for the engine thread instead of running beside it. While a
# fill is in flight the interval is this. One Python thread per fill, not one per share: with 8 the hand-offs
# queued, and the engine thread waited 0.84-0.89 ms a step for the fill against 0.26-0.35 ms with one (H200,
# scripts/probe_json_step.py).
FILL_SWITCH_INTERVAL_S = 1e-4
_switch_lock = threading.Lock()
_fills_in_flight = 0
_saved_switch_interval = 0.0
# xgrammar's messages start with a timestamp, the C++ file and line: noise to a client.
_NOISE = re.compile(r"^\[[\d:]+\] \S+?:\d+: (Check failed: \(.*?\) is false: )?")
_JSON_OBJECT = '{"type": "object"}'
# One character of a length-bounded string: no control character, quote or backslash, and no code point whose
# UTF-8 lead byte is E0, ED or F0-F4, because xgrammar also lets through the invalid sequences those leads can
# start (overlong E0 80 80, surrogates, F0 8A ..), which decode to several U+FFFD and break maxLength.
_BOUNDED_CHAR = "[ !#-\\[\\]-\u07ff\u1000-\ucfff\ue000-\uffff]"


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # a dependency in pyproject.toml; say what to do if it is missing anyway
        raise ValueError(f"structured outputs need the xgrammar package (pip install xgrammar): {e}") from None
    return xgrammar


def _bounded_strings_as_patterns(schema):
    """xgrammar 0.2.9 compiles a string with minLength / maxLength to a bare character class that admits raw
    control characters (invalid JSON; xgrammar issue #800); its `pattern` path is JSON-string aware. So a
    length-bounded string without a pattern of its own becomes a pattern of _BOUNDED_CHAR{min,max}."""
    if isinstance(schema, list):
        return [_bounded_strings_as_patterns(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _bounded_strings_as_patterns(v) for k, v in schema.items()}
    bounds = [out.get("minLength"), out.get("maxLength")]
    if (out.get("type") == "string" and any(isinstance(b, int) for b in bounds)
            and not any(k in out for k in ("pattern", "format", "enum", "const"))):
        lo, hi = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^{_BOUNDED_CHAR}{{{lo},{hi}}}$"
    return out


def _schema_text(text: str) -> str:
    return json.dumps(_bounded_strings_as_patterns(json.loads(text)))


def _choice_ebnf(choices: list[str]) -> str:
    # JSON string literals are valid EBNF string literals for xgrammar (same escapes).
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _message(e: Exception) -> str:
    return _NOISE.sub("", str(e).strip()).strip() or type(e).__name__


class GrammarError(ValueError):
    """A schema, regex or grammar that does not parse (the server's 400 names response_format)."""


def check(params: StructuredOutputsParams) -> None:
    """Raise GrammarError naming the problem if the schema / regex / grammar does not parse. No tokenizer needed."""
    xgr = _xgrammar()
    kind, text = params.spec()
    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(_schema_text(text), any_whitespace=False)
        elif kind == "regex":
            xgr.Grammar.from_regex(text)
        elif kind == "choice":
            xgr.Grammar.from_ebnf(_choice_ebnf(json.loads(text)))
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(text)
    except (RuntimeError, ValueError, TypeError) as e:
        what = {"json": "json schema", "regex": "regex", "choice": "choice", "grammar": "grammar (xgrammar EBNF)"}
        raise GrammarError(f"invalid {what[kind]}: {_message(e)}") from None


@dataclass
class SequenceGrammar:
    """One sequence's grammar: its compile (shared by equal specs through the compiler's cache), then its matcher."""
    future: concurrent.futures.Future | None = None
    # When a compile thread took it up: the time limit counts from there, not from the queue (another client's
    # slow schemas ahead of it in the queue must not run out a fast one's time).
    started: float | None = None
    matcher: Any = None  # xgrammar.GrammarMatcher once ready


def default_fill_threads() -> int:
    """The usable CPUs, at most MAX_FILL_THREADS. Counted from the affinity mask, not the machine: a process pinned
    to a few cores of a large host must not start a thread per host CPU (xgrammar's "auto" counts the host's)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_FILL_THREADS, cpus))


class StructuredOutputManager:
    """Per engine core: the compiler (built lazily from the model folder's tokenizer), the compile threads, the
    mask-fill threads and the host bitmask buffer."""

    def __init__(self, tokenizer_folder: str, vocab_size: int, eos_token_ids: frozenset[int], device: torch.device,
                 fill_threads: int | None = None):
        self.tokenizer_folder, self.vocab_size, self.device = tokenizer_folder, vocab_size, device
        self.eos_token_ids = sorted(eos_token_ids)
        self.pool = concurrent.futures.ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="splitserve-grammar")
        self._compiler = None
        self._compiler_lock = threading.Lock()
        self._bitmask: torch.Tensor | None = None  # [rows, ceil(V / 32)] int32 on the host, grown as needed
        self.fill_threads = fill_threads or default_fill_threads()  # the most C++ threads one fill uses
        # The Python thread that makes the fill's call, so that the engine thread goes on meanwhile.
        self._fill_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="splitserve-mask")
        self._fillers: dict[int, Any] = {}  # C++ threads -> xgrammar.BatchGrammarMatcher

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._fill_pool.shutdown(wait=False)

    # ---- compile (in the pool) ----
    def compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                from splitserve.models.loader import load_tokenizer

                xgr = _xgrammar()
                tokenizer = load_tokenizer(self.tokenizer_folder)
                if tokenizer is None:
                    raise ValueError(f"structured outputs need a tokenizer, and {self.tokenizer_folder!r} has none")
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.eos_token_ids or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS,
                                                     cache_limit_bytes=GRAMMAR_CACHE_BYTES)
            return self._compiler

    def _compile(self, kind: str, text: str):
        compiler = self.compiler()
        if kind == "json":
            return compiler.compile_json_schema(_schema_text(text), any_whitespace=False)
        if kind == "json_object":
            return compiler.compile_json_schema(_JSON_OBJECT, any_whitespace=False)
        if kind == "regex":
            return compiler.compile_regex(text)
        if kind == "choice":
            return compiler.compile_grammar(_choice_ebnf(json.loads(text)))
        return compiler.compile_grammar(text)

    def submit(self, params: StructuredOutputsParams) -> SequenceGrammar:
        grammar = SequenceGrammar()
        grammar.future = self.pool.submit(self._compile_timed, grammar, *params.spec())
        return grammar

    def _compile_timed(self, grammar: SequenceGrammar, kind: str, text: str):
        grammar.started = time.monotonic()
        return self._compile(kind, text)

    def make_ready(self, grammar: SequenceGrammar, output_token_ids: list[int]) -> bool:
        """True once the grammar is compiled and its matcher has replayed `output_token_ids` (tokens generated
        elsewhere: the PD prefill worker). Raises ValueError if the compile failed or ran out of time."""
        if grammar.matcher is not None:
            return True
        if not grammar.future.done():
            started = grammar.started
            if started is not None and time.monotonic() - started > COMPILE_TIMEOUT_S:
                grammar.future.cancel()
                raise ValueError(f"the grammar took longer than {COMPILE_TIMEOUT_S:g} s to compile")
            return False
        try:
            compiled = grammar.future.result()
        except Exception as e:  # noqa: BLE001 - the request fails, the engine goes on
            raise ValueError(f"the grammar failed to compile: {_message(e)}") from None
        matcher = _xgrammar().GrammarMatcher(compiled)
        for token in output_token_ids:
            if not matcher.accept_token(token):
                raise ValueError(f"the grammar rejects token {token} of the output already generated")
        grammar.matcher = matcher
        return True

    @staticmethod
    def wait(grammars: list[SequenceGrammar], timeout_s: float) -> None:
        """Block until one of these compiles is done, at most `timeout_s` (an idle step loop must not spin)."""
        concurrent.futures.wait([g.future for g in grammars], timeout_s, concurrent.futures.FIRST_COMPLETED)

    # ---- every step ----
    def fill_bitmask(self, grammars: list[SequenceGrammar | None]) -> tuple[torch.Tensor, list[int]] | None:
        """Host bitmask [len(grammars), ceil(V / 32)] with the rows of the sequences that have a grammar filled
        (the other rows are left as they are and not applied), and those rows; None when there are none."""
        return self.start_fill(grammars).result()

    def start_fill(self, grammars: list[SequenceGrammar | None]) -> BitmaskFill:
        """`fill_bitmask` in the fill thread; the caller goes on (the engine thread runs the front end meanwhile)
        and takes the result when it needs it. The matchers must not accept tokens, and the host bitmask must
        not be read, until then."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return BitmaskFill(None, rows, None)
        xgr = _xgrammar()
        if self._bitmask is None or self._bitmask.shape[0] < len(grammars):
            bitmask = xgr.allocate_token_bitmask(max(len(grammars), 64), self.vocab_size)
            self._bitmask = bitmask.pin_memory() if self.device.type == "cuda" else bitmask
        threads = max(1, min(self.fill_threads, -(-len(rows) // ROWS_PER_FILL_THREAD)))
        filler = self._fillers.get(threads)
        if filler is None:
            filler = self._fillers[threads] = xgr.BatchGrammarMatcher(max_threads=threads)
        bitmask = self._bitmask[: len(grammars)]
        # One call, C++ without the GIL: the engine thread goes on beside it.
        future = self._fill_pool.submit(filler.batch_fill_next_token_bitmask, [grammars[i].matcher for i in rows],
                                        bitmask, rows)
        _switch_interval_for_fills(+1)
        return BitmaskFill(bitmask, rows, future)


def _switch_interval_for_fills(change: int) -> None:
    """Count fills in flight (+1 / -1); FILL_SWITCH_INTERVAL_S while any is, the interval found before otherwise."""
    global _fills_in_flight, _saved_switch_interval
    with _switch_lock:
        if _fills_in_flight == 0 and change > 0:
            _saved_switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(FILL_SWITCH_INTERVAL_S, _saved_switch_interval))
        _fills_in_flight += change
        if _fills_in_flight == 0:
            sys.setswitchinterval(_saved_switch_interval)


class BitmaskFill:
    """A bitmask fill under way in the fill thread."""

    def __init__(self, bitmask: torch.Tensor | None, rows: list[int], future: concurrent.futures.Future | None):
        self.bitmask, self.rows, self.future = bitmask, rows, future

    def result(self) -> tuple[torch.Tensor, list[int]] | None:
        """(host bitmask, its filled rows) once the fill is done, or None when no row has a grammar; raises what
        the fill raised, after it has stopped writing into the buffer."""
        if self.future is not None:
            future, self.future = self.future, None
            concurrent.futures.wait([future])
            _switch_interval_for_fills(-1)
            future.result()
        return None if self.bitmask is None else (self.bitmask, self.rows)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | list[int] | None) -> None:
    """Set to -inf, in place, the logits of the tokens a row's grammar forbids (rows None: every row);
    xgrammar's own kernel on the device (CUDA or Triton on a GPU, C++ on the CPU)."""
    _xgrammar().apply_token_bitmask_inplace(logits, bitmask, indices=rows)


def accept_tokens(matchers: list, tokens: list[int]) -> list[bool]:
    """Each matcher takes its token (one call into xgrammar for the batch); whether each was accepted."""
    return _xgrammar().BatchGrammarMatcher.batch_accept_token(matchers, tokens)
