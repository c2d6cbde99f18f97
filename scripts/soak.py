#!/usr/bin/env python3
"""Bounded soak of a live splitserve server on loopback (issue 17's measurement).

Starts `python3 -m splitserve serve` on 127.0.0.1 (a fresh server per phase), sends a fixed, seeded mix of
completions and chat requests (streamed and not, greedy and seeded sampling) at a fixed concurrency, drops
some streams mid-way, gives some requests a short client timeout, optionally mixes in malformed requests,
then checks:

* 0 responses with a 5xx status (client side and in `/metrics`);
* 0 collateral failures: a well-formed request the client neither dropped nor timed out that did not end
  with 200 and a finish_reason (and, streamed, without an in-stream error and with `[DONE]`);
* every malformed request answered 4xx in OpenAI's error shape (`{"error": {"message": ...}}`);
* `/metrics` counts per endpoint equal to the requests sent;
* `/stats` kv_used_blocks == 0 once the load is over;
* a greedy request answered the same before and after the soak;
* the server's RSS (VmRSS of its pid) after the soak.

Phases: `clean` (no malformed requests) and `malformed` (the same well-formed requests plus malformed ones
making up --malformed-fraction of all requests), each on a freshly started server; RSS after `malformed`
is compared to RSS after `clean`.

Only standard-library HTTP (asyncio sockets, HTTP/1.1, one connection per request), so that bytes on the
wire are exactly as written (NaN literals, bad UTF-8, missing auth). Every loop is bounded in count and time:
the whole run stops by itself within --time-limit seconds.

    python3 scripts/soak.py --make-tiny-model /tmp/soak-tiny-qwen3 --out /tmp/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

HOST = "127.0.0.1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
WORDS = ("the quick brown fox jumps over a lazy dog while seven small robots count red apples near an old "
         "stone bridge under bright stars and quiet rivers carry paper boats toward distant green hills "
         "where children sing songs about clocks rain bread music").split()
GREEDY_CHECKS = {
    "/v1/completions": {"prompt": "The capital of France is", "max_tokens": 32, "temperature": 0},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Name three colors."}],
                             "max_tokens": 32, "temperature": 0},
}
LARGE_BODY = 1 << 20  # bodies above this go through _blocking_call
METRIC_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/stats"}


# ---------------------------------------------------------------------------------------------- model ----
def make_tiny_model(path: str) -> str:
    """A random-weight Qwen3 checkpoint sharing the default model's tokenizer (as tests/conftest.py makes)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    import transformers

    from splitserve.models.loader import resolve_model

    cfg = transformers.Qwen3Config(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6,
        tie_word_embeddings=False, initializer_range=0.05, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).float()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    src_dir = resolve_model(None)
    for name in TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.exists(src):
            shutil.copy(src, path)
    return path


# ----------------------------------------------------------------------------------------------- HTTP ----
@dataclass
class Response:
    status: int | None = None
    body: bytes = b""
    events: list = field(default_factory=list)  # parsed SSE data objects ("[DONE]" kept as the string)
    dropped: bool = False  # the client closed the stream on purpose
    timed_out: bool = False
    error: str | None = None  # a transport error (no complete answer)
    latency_s: float = 0.0


async def http_call(port: int, method: str, path: str, body: bytes | None, headers: dict[str, str],
                    timeout: float, drop_after: int | None = None) -> Response:
    """One HTTP/1.1 request on its own connection (Connection: close). `drop_after`: close the connection after
    that many SSE events with content. The body is written while the answer is read, so an early answer
    (413 before the body is read) is seen even if the server then resets the connection."""
    r = Response()
    t0 = time.monotonic()
    writer = None

    async def run():
        nonlocal writer
        reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 22)
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n"
        for k, v in headers.items():
            head += f"{k}: {v}\r\n"
        if body is not None:
            head += f"Content-Length: {len(body)}\r\n"
        writer.write(head.encode("latin-1") + b"\r\n")

        async def send_body():
            with contextlib.suppress(ConnectionError, OSError):
                if body:
                    for i in range(0, len(body), 1 << 16):
                        writer.write(body[i:i + (1 << 16)])
                        await writer.drain()
                await writer.drain()

        sender = asyncio.create_task(send_body())
        try:
            await read_response(reader, writer, r, drop_after)
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender

    try:
        await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        r.timed_out = True
    except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError) as e:
        if not r.dropped:
            r.error = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(writer.wait_closed(), 2)
    r.latency_s = time.monotonic() - t0
    return r


def _blocking_call(port: int, method: str, path: str, body: bytes, headers: dict[str, str], timeout: float,
                   ) -> Response:
    """For large bodies: a blocking socket that stops sending as soon as the answer begins, then reads it.

    The server answers an oversized body (413) without reading it and closes, so the kernel resets the
    connection while the client is still sending. asyncio's transport turns the failed write into a
    connection_lost that discards the answer already received; a plain socket still returns the queued
    answer before reporting the reset, as curl and test_abuse.py's raw client do."""
    import select

    r = Response()
    t0 = time.monotonic()
    deadline = t0 + timeout

    def left() -> float:
        rest = deadline - time.monotonic()
        if rest <= 0:
            raise TimeoutError
        return rest

    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n"
    for k, v in headers.items():
        head += f"{k}: {v}\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    data = b""
    try:
        with socket.create_connection((HOST, port), timeout=left()) as s:
            try:
                s.settimeout(left())
                s.sendall(head.encode("latin-1"))
                for i in range(0, len(body), 1 << 16):
                    if select.select([s], [], [], 0)[0]:
                        break  # the answer has begun: stop sending
                    s.settimeout(left())
                    s.sendall(body[i:i + (1 << 16)])
            except (BrokenPipeError, ConnectionResetError):
                pass
            for _ in range(1 << 16):
                s.settimeout(left())
                try:
                    more = s.recv(1 << 16)
                except ConnectionResetError:
                    if data:
                        break
                    raise
                if not more:
                    break
                data += more
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        r.status = int(lines[0].split()[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        if hdrs.get("transfer-encoding", "").lower() == "chunked":
            body_out = b""
            for _ in range(1 << 16):
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                body_out, rest = body_out + rest[:size], rest[size + 2:]
            r.body = body_out
        else:
            r.body = rest[:int(hdrs.get("content-length", len(rest)))]
    except TimeoutError:
        r.timed_out = True
    except (OSError, ValueError, IndexError) as e:
        r.error = f"{type(e).__name__}: {e}; received {data[:200]!r}"
    r.latency_s = time.monotonic() - t0
    return r


async def read_response(reader: asyncio.StreamReader, writer, r: Response, drop_after: int | None) -> None:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before the status line")
    r.status = int(status_line.split()[1])
    hdrs = {}
    for _ in range(200):
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        hdrs[k.strip().lower()] = v.strip()
    sse = hdrs.get("content-type", "").startswith("text/event-stream")
    buf = b""
    content_events = 0

    def feed(data: bytes) -> bool:
        """Add body bytes; parse complete SSE events; True when the stream should be dropped now."""
        nonlocal buf, content_events
        if not sse:
            r.body += data
            return False
        buf += data
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    payload = line[6:].decode()
                    obj = payload if payload == "[DONE]" else json.loads(payload)
                    r.events.append(obj)
                    if isinstance(obj, dict) and obj.get("choices"):
                        content_events += 1
        return drop_after is not None and content_events >= drop_after

    if hdrs.get("transfer-encoding", "").lower() == "chunked":
        for _ in range(1 << 20):
            size_line = await reader.readline()
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            if feed(data):
                r.dropped = True
                writer.close()  # the client goes away mid-stream
                return
    elif "content-length" in hdrs:
        feed(await reader.readexactly(int(hdrs["content-length"])))
    else:
        feed(await reader.read())


# ------------------------------------------------------------------------------------------- requests ----
@dataclass
class Spec:
    index: int
    kind: str  # normal | drop | timeout | malformed
    method: str = "POST"
    path: str = "/v1/completions"
    body: bytes = b""
    auth: bool = True
    extra_headers: dict = field(default_factory=dict)
    stream: bool = False
    max_tokens: int = 0
    drop_after: int | None = None
    timeout_s: float = 120.0
    malformed: str | None = None  # the corpus case's name


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def wellformed_spec(rng: random.Random, index: int, args) -> Spec:
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    kind = "normal"
    max_tokens = rng.randint(1, 32)
    drop_after = None
    timeout_s = args.request_timeout
    if stream and rng.random() < args.drop_fraction:
        kind, drop_after = "drop", rng.randint(1, 3)
        max_tokens = rng.randint(8, 32)  # long enough that the drop lands mid-stream
    elif rng.random() < args.timeout_fraction:
        kind, timeout_s = "timeout", round(rng.uniform(0.05, 1.0), 3)
    body: dict = {"max_tokens": max_tokens, "stream": stream}
    if rng.random() < 0.5:
        body["temperature"] = 0.0
    else:
        body["temperature"], body["seed"] = 0.8, rng.randrange(1 << 31)
    if rng.random() < 0.1:
        body["stop"] = [rng.choice(WORDS)]
    if stream and rng.random() < 0.25:
        body["stream_options"] = {"include_usage": True}
    if chat:
        messages = [{"role": "user", "content": _words(rng, 1, 40)}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": _words(rng, 2, 12)})
        body["messages"] = messages
        path = "/v1/chat/completions"
    else:
        body["prompt"] = ([rng.randrange(3, 49152) for _ in range(rng.randint(1, 64))] if rng.random() < 0.1
                          else _words(rng, 1, 40))
        path = "/v1/completions"
    return Spec(index, kind, path=path, body=json.dumps(body).encode(), stream=stream, max_tokens=max_tokens,
                drop_after=drop_after, timeout_s=timeout_s)


def malformed_corpus() -> list[tuple[str, dict]]:
    """(name, Spec fields). Every one must be answered 4xx in OpenAI's error shape."""
    c, cc = "/v1/completions", "/v1/chat/completions"

    def j(obj) -> bytes:
        return json.dumps(obj).encode()

    msg = [{"role": "user", "content": "Hi"}]
    five_mb = b'{"prompt": "' + b"a b " * (5 * (1 << 20) // 4) + b'", "max_tokens": 2}'
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return [
        ("bad_json", {"path": c, "body": b'{"prompt": "Hello", "max_tokens": 4'}),
        ("json_not_object", {"path": c, "body": b"[1, 2, 3]"}),
        ("empty_body", {"path": c, "body": b""}),
        ("prompt_wrong_type", {"path": c, "body": j({"prompt": 12345, "max_tokens": 4})}),
        ("max_tokens_wrong_type", {"path": c, "body": j({"prompt": "Hi", "max_tokens": "ten"})}),
        ("stream_yes", {"path": c, "body": j({"prompt": "Hi", "max_tokens": 4, "stream": "yes"})}),
        ("temperature_nan", {"path": c, "body": b'{"prompt": "Hi", "max_tokens": 4, "temperature": NaN}'}),
        ("temperature_inf", {"path": cc, "body": j({"messages": msg, "max_tokens": 4})[:-1]
                             + b', "temperature": Infinity}'}),
        ("temperature_negative", {"path": c, "body": j({"prompt": "Hi", "max_tokens": 4, "temperature": -1.0})}),
        ("seed_2**64", {"path": c, "body": j({"prompt": "Hi", "max_tokens": 4, "temperature": 0.7,
                                               "seed": 2**64})}),
        ("seed_-2**63-1", {"path": cc, "body": j({"messages": msg, "max_tokens": 4, "temperature": 0.7,
                                                   "seed": -2**63 - 1})}),
        ("top_k_2**63", {"path": c, "body": j({"prompt": "Hi", "max_tokens": 4, "temperature": 0.7,
                                                "top_k": 2**63})}),
        ("max_tokens_10**30", {"path": c, "body": j({"prompt": "Hi", "max_tokens": 10**30})}),
        ("max_tokens_over_context", {"path": cc, "body": j({"messages": msg, "max_tokens": 10**6})}),
        ("chat_max_tokens_0", {"path": cc, "body": j({"messages": msg, "max_tokens": 0})}),
        ("too_many_stop_strings", {"path": c, "body": j({"prompt": "Hi", "max_tokens": 4,
                                                          "stop": [f"s{i}" for i in range(1000)]})}),
        ("too_many_prompts", {"path": c, "body": j({"prompt": ["Hi"] * 200, "max_tokens": 2})}),
        ("body_5MB", {"path": c, "body": five_mb}),
        ("unknown_model", {"path": c, "body": j({"model": "gpt-nonexistent", "prompt": "Hi", "max_tokens": 4})}),
        ("missing_auth", {"path": c, "body": j({"prompt": "Hi", "max_tokens": 4}), "auth": False}),
        ("wrong_auth", {"path": cc, "body": j({"messages": msg, "max_tokens": 4}), "auth": False,
                        "extra_headers": {"Authorization": "Bearer wrong-key"}}),
        ("non_utf8_body", {"path": c, "body": b'{"prompt": "\xff\xfe\xfa", "max_tokens": 4}'}),
        ("deep_nesting_100k", {"path": c, "body": deep}),
        ("lone_surrogate", {"path": c, "body": b'{"prompt": "\\ud800", "max_tokens": 4}'}),
        ("unknown_field", {"path": c, "body": j({"prompt": "Hi", "max_tokens": 4, "frobnicate": 1})}),
        ("n_2", {"path": c, "body": j({"prompt": "Hi", "max_tokens": 4, "n": 2})}),
        ("chat_empty_messages", {"path": cc, "body": j({"messages": [], "max_tokens": 4})}),
        ("chat_bad_role", {"path": cc, "body": j({"messages": [{"role": "wizard", "content": "Hi"}]})}),
        ("method_not_allowed", {"method": "GET", "path": c, "body": None}),
        ("unknown_path", {"path": "/v1/nothing-here", "body": j({"prompt": "Hi"})}),
    ]


def build_plan(args, malformed_fraction: float) -> list[Spec]:
    """The same well-formed requests for every phase (one seed); malformed ones inserted at seeded places."""
    rng = random.Random(args.seed)
    specs = [wellformed_spec(rng, i, args) for i in range(args.requests)]
    if malformed_fraction > 0:
        mrng = random.Random(args.seed + 1)
        corpus = malformed_corpus()
        n_bad = round(args.requests * malformed_fraction / (1 - malformed_fraction))
        order = list(range(len(corpus)))
        for k in range(n_bad):
            if k % len(corpus) == 0:
                mrng.shuffle(order)
            name, fields = corpus[order[k % len(corpus)]]
            spec = Spec(-1, "malformed", malformed=name, timeout_s=args.request_timeout, **fields)
            specs.insert(mrng.randrange(len(specs) + 1), spec)
    for i, s in enumerate(specs):
        s.index = i
    return specs


# ------------------------------------------------------------------------------------------- judging ----
def openai_error_shape(body: bytes) -> bool:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    err = obj.get("error") if isinstance(obj, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)


def judge(spec: Spec, r: Response) -> tuple[str, str | None]:
    """→ (outcome, problem). Outcomes: ok, dropped, client_timeout, malformed_ok, collateral, malformed_bad."""
    if spec.kind == "malformed":
        if r.status is not None and 400 <= r.status < 500 and openai_error_shape(r.body):
            return "malformed_ok", None
        return "malformed_bad", (f"status {r.status}, timed_out={r.timed_out}, error={r.error}, "
                                 f"body {r.body[:300]!r}")
    errors = [e for e in r.events if isinstance(e, dict) and "error" in e]
    if errors:
        return "collateral", f"in-stream error {errors[0]}"
    if r.dropped:
        return "dropped", None
    if r.timed_out and spec.kind == "timeout":
        return "client_timeout", None
    if r.timed_out:
        return "collateral", f"no answer within the client's {spec.timeout_s} s"
    if r.error:
        return "collateral", r.error
    if r.status != 200:
        return "collateral", f"status {r.status}: {r.body[:300]!r}"
    if spec.stream:
        if not r.events or r.events[-1] != "[DONE]":
            return "collateral", "stream ended without [DONE]"
        finishes = [c.get("finish_reason") for e in r.events if isinstance(e, dict)
                    for c in e.get("choices") or [] if c.get("finish_reason")]
        if not finishes:
            return "collateral", "stream without a finish_reason"
        n_out = None
        for e in r.events:  # include_usage: the usage chunk must respect max_tokens
            if isinstance(e, dict) and e.get("usage"):
                n_out = e["usage"]["completion_tokens"]
    else:
        try:
            obj = json.loads(r.body)
            finish = obj["choices"][0]["finish_reason"]
            n_out = obj["usage"]["completion_tokens"]
        except (ValueError, KeyError, IndexError, TypeError):
            return "collateral", f"unparsable answer {r.body[:300]!r}"
        if not finish:
            return "collateral", "no finish_reason"
    if n_out is not None and n_out > spec.max_tokens:
        return "collateral", f"{n_out} tokens for max_tokens={spec.max_tokens}"
    return "ok", None


def answer_text(path: str, body: bytes) -> str:
    obj = json.loads(body)
    c = obj["choices"][0]
    return c["text"] if path == "/v1/completions" else c["message"]["content"]


# -------------------------------------------------------------------------------------------- server ----
class Server:
    def __init__(self, args, log_path: str):
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        self.api_key, self.log_path = args.api_key, log_path
        cmd = [sys.executable, "-m", "splitserve", "serve", "--model", args.model, "--device", "cpu",
               "--host", HOST, "--port", str(self.port), "--api-key", args.api_key]
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def headers(self, auth: bool = True) -> dict:
        h = {"Content-Type": "application/json"}
        if auth:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    async def get_json(self, path: str, timeout: float = 30) -> tuple[int | None, object]:
        r = await http_call(self.port, "GET", path, None, self.headers(), timeout)
        if path == "/metrics":
            return r.status, r.body.decode(errors="replace")
        try:
            return r.status, json.loads(r.body)
        except ValueError:
            return r.status, None

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            r = await http_call(self.port, "GET", "/health", None, {}, 5)
            if r.status == 200:
                return
            await asyncio.sleep(1)
        raise RuntimeError(f"server not ready within {timeout} s; see {self.log_path}")

    def rss_kib(self) -> dict:
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1])
        return out

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def parse_http_counts(text: str) -> dict[str, dict[str, float]]:
    counts: dict[str, dict[str, float]] = {}
    pat = re.compile(r'^splitserve_http_requests_total\{endpoint="([^"]*)",status="([^"]*)"\} (\S+)$')
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            counts.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
    return counts


def parse_finished(text: str) -> dict[str, int]:
    """Generation requests the engine finished, by reason ("abort": the client left before the end)."""
    pat = re.compile(r'^splitserve_requests_finished_total\{finish_reason="([^"]*)"\} (\S+)$')
    return {m.group(1): int(float(m.group(2))) for m in map(pat.match, text.splitlines()) if m}


def machine_info() -> dict:
    info: dict = {"cpu_count": os.cpu_count(), "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
                  "python": sys.version.split()[0]}
    with contextlib.suppress(OSError):
        info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                  if line.startswith("model name")), None)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            timeout=10, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    return info


def log_problems(path: str, limit: int = 40) -> tuple[int, list[str]]:
    lines = open(path, errors="replace").read().splitlines()
    hits = [i for i, line in enumerate(lines) if re.search(r"\bERROR\b|Traceback|CRITICAL", line)]
    excerpt: list[str] = []
    for i in hits:
        excerpt += lines[i:i + 12]
        if len(excerpt) >= limit:
            break
    return len(hits), excerpt[:limit]


# --------------------------------------------------------------------------------------------- phase ----
async def run_phase(name: str, args, malformed_fraction: float, deadline: float) -> dict:
    specs = build_plan(args, malformed_fraction)
    log_path = os.path.join(args.log_dir, f"server-{name}.log")
    server = Server(args, log_path)
    sent: dict[str, int] = {}

    def count_sent(path: str) -> None:
        label = path if path in METRIC_ENDPOINTS else "other"
        sent[label] = sent.get(label, 0) + 1

    result: dict = {"phase": name, "port": server.port, "server_pid": server.pid, "server_log": log_path}
    try:
        await server.wait_ready(min(args.startup_timeout, deadline - time.monotonic()))
        result["rss_kib_ready"] = server.rss_kib()

        async def greedy() -> dict:
            out = {}
            for path, body in GREEDY_CHECKS.items():
                count_sent(path)
                r = await http_call(server.port, "POST", path, json.dumps(body).encode(), server.headers(), 120)
                out[path] = answer_text(path, r.body) if r.status == 200 else f"<status {r.status}: {r.error}>"
            return out

        greedy_before = await greedy()
        result["rss_kib_before_soak"] = server.rss_kib()

        outcomes: dict[str, int] = {}
        problems: list[dict] = []
        malformed_by_case: dict[str, dict[str, int]] = {}
        status_counts: dict[str, int] = {}
        latencies: list[float] = []
        not_sent = wellformed_sent = malformed_sent = 0
        queue: asyncio.Queue[Spec] = asyncio.Queue()
        for s in specs:
            queue.put_nowait(s)
        t0 = time.monotonic()

        async def worker() -> None:
            nonlocal not_sent, wellformed_sent, malformed_sent
            while not queue.empty():
                spec = queue.get_nowait()
                if time.monotonic() > deadline - args.reserve_s:
                    not_sent += 1
                    continue
                count_sent(spec.path)
                if spec.malformed:
                    malformed_sent += 1
                else:
                    wellformed_sent += 1
                headers = server.headers(spec.auth)
                headers.update(spec.extra_headers)
                if spec.body and len(spec.body) > LARGE_BODY:
                    r = await asyncio.to_thread(_blocking_call, server.port, spec.method, spec.path, spec.body,
                                                headers, spec.timeout_s)
                else:
                    r = await http_call(server.port, spec.method, spec.path, spec.body, headers, spec.timeout_s,
                                        spec.drop_after)
                outcome, problem = judge(spec, r)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                status_counts[str(r.status)] = status_counts.get(str(r.status), 0) + 1
                if outcome == "ok":
                    latencies.append(r.latency_s)
                if spec.malformed:
                    case = malformed_by_case.setdefault(spec.malformed, {"sent": 0, "4xx_openai_shape": 0,
                                                                         "statuses": {}})
                    case["sent"] += 1
                    case["4xx_openai_shape"] += outcome == "malformed_ok"
                    case["statuses"][str(r.status)] = case["statuses"].get(str(r.status), 0) + 1
                if problem and len(problems) < 50:
                    problems.append({"index": spec.index, "kind": spec.kind, "case": spec.malformed,
                                     "path": spec.path, "outcome": outcome, "problem": problem,
                                     "request": spec.body[:200].decode(errors="replace") if spec.body else None})

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        soak_s = time.monotonic() - t0

        # Let the server finish what the clients left (aborts, timeouts), then read its counters.
        stats: dict = {}
        for _ in range(120):
            _, stats = await server.get_json("/stats")
            if isinstance(stats, dict) and stats.get("running") == 0 and stats.get("waiting") == 0:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)  # a 499 is counted up to one disconnect poll (0.5 s) after the client left
        gen_paths = ("/v1/completions", "/v1/chat/completions", "other")
        metrics_counts: dict = {}
        for _ in range(30):
            _, text = await server.get_json("/metrics")
            metrics_counts = parse_http_counts(text or "")
            if all(sum(metrics_counts.get(p, {}).values()) == sent.get(p, 0) for p in gen_paths):
                break
            await asyncio.sleep(1.0)
        _, stats = await server.get_json("/stats")
        greedy_after = await greedy()
        _, text = await server.get_json("/metrics")
        metrics_counts = parse_http_counts(text or "")
        result["metrics_requests_finished"] = parse_finished(text or "")
        result["rss_kib_after_soak"] = server.rss_kib()
        metrics_total = {p: int(sum(metrics_counts.get(p, {}).values())) for p in gen_paths}
        metrics_5xx = int(sum(v for p in metrics_counts.values() for s, v in p.items() if s.startswith("5")))
        result.update({
            "requests_planned": len(specs), "requests_sent": len(specs) - not_sent, "not_sent_deadline": not_sent,
            "wellformed_sent": wellformed_sent, "malformed_sent": malformed_sent,
            "planned_by_kind": {k: sum(1 for s in specs if s.kind == k)
                                for k in ("normal", "drop", "timeout", "malformed")},
            "soak_seconds": round(soak_s, 1), "requests_per_s": round((len(specs) - not_sent) / soak_s, 1),
            "outcomes": outcomes, "client_status_counts": status_counts,
            "client_5xx": sum(v for k, v in status_counts.items() if k.startswith("5")),
            "collateral_failures": outcomes.get("collateral", 0),
            "malformed_not_4xx_openai": outcomes.get("malformed_bad", 0),
            "malformed_by_case": malformed_by_case,
            "problems": problems,
            "latency_ok_s": ({"p50": round(statistics.median(latencies), 3),
                              "p99": round(sorted(latencies)[int(0.99 * (len(latencies) - 1))], 3),
                              "max": round(max(latencies), 3)} if latencies else None),
            "sent_by_endpoint_incl_greedy_checks": {p: sent.get(p, 0) for p in gen_paths},
            "metrics_by_endpoint": metrics_total,
            "metrics_http_counts": metrics_counts,
            "metrics_5xx": metrics_5xx,
            "metrics_match_sent": all(metrics_total[p] == sent.get(p, 0) for p in gen_paths),
            "stats_after": {k: stats.get(k) for k in ("kv_used_blocks", "num_kv_blocks", "running", "waiting",
                                                      "num_preemptions", "num_steps")}
            if isinstance(stats, dict) else None,
            "greedy_before": greedy_before, "greedy_after": greedy_after,
            "greedy_unchanged": greedy_before == greedy_after
            and not any(v.startswith("<status") for v in greedy_before.values()),
        })
    finally:
        result["server_exit_code"] = server.stop()
        result["server_log_problem_lines"], result["server_log_excerpt"] = log_problems(log_path)
    return result


async def main_async(args) -> dict:
    start = time.monotonic()
    deadline = start + args.time_limit
    phases = [p for p in args.phases.split(",") if p]
    out: dict = {"config": {k: v for k, v in vars(args).items() if k != "api_key"}, "phases": {},
                 "machine": machine_info()}
    for i, name in enumerate(phases):
        # Share what is left between the phases still to run.
        left = deadline - time.monotonic()
        phase_deadline = time.monotonic() + left / (len(phases) - i)
        fraction = args.malformed_fraction if name == "malformed" else 0.0
        print(f"[soak] phase {name}: starting (budget {phase_deadline - time.monotonic():.0f} s)", flush=True)
        out["phases"][name] = res = await run_phase(name, args, fraction, phase_deadline)
        summary = {k: res.get(k) for k in ("requests_sent", "outcomes", "client_5xx", "collateral_failures",
                                           "malformed_not_4xx_openai", "metrics_match_sent", "stats_after",
                                           "greedy_unchanged", "rss_kib_after_soak", "soak_seconds")}
        print(f"[soak] phase {name}: {json.dumps(summary)}", flush=True)
    p = out["phases"]
    if "clean" in p and "malformed" in p:
        clean, bad = p["clean"]["rss_kib_after_soak"]["VmRSS"], p["malformed"]["rss_kib_after_soak"]["VmRSS"]
        out["rss_ratio_malformed_over_clean"] = round(bad / clean, 4)
    goals = {}
    for name, res in p.items():
        goals[name] = {
            "zero_5xx": res.get("client_5xx") == 0 and res.get("metrics_5xx") == 0,
            "zero_collateral_failures": res.get("collateral_failures") == 0,
            "kv_blocks_all_free": (res.get("stats_after") or {}).get("kv_used_blocks") == 0,
            "metrics_match_sent": res.get("metrics_match_sent"),
            "greedy_unchanged": res.get("greedy_unchanged"),
            "all_sent": res.get("not_sent_deadline") == 0,
        }
        if name == "malformed":
            goals[name]["every_malformed_4xx_openai_shape"] = res.get("malformed_not_4xx_openai") == 0
    if "rss_ratio_malformed_over_clean" in out:
        goals["rss_ratio_le_1.2"] = out["rss_ratio_malformed_over_clean"] <= 1.2
    out["goals"] = goals
    out["total_seconds"] = round(time.monotonic() - start, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder to serve")
    ap.add_argument("--make-tiny-model", default=None, metavar="DIR",
                    help="create (if absent) a random-weight tiny Qwen3 in DIR and serve it")
    ap.add_argument("--phases", default="clean,malformed", help="comma-separated: clean, malformed")
    ap.add_argument("--requests", type=int, default=1600, help="well-formed requests per phase")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--drop-fraction", type=float, default=0.2, help="of streamed requests, dropped mid-way")
    ap.add_argument("--timeout-fraction", type=float, default=0.06,
                    help="of the other requests, sent with a short client timeout (0.05-1 s)")
    ap.add_argument("--malformed-fraction", type=float, default=0.1, help="of all requests in the malformed phase")
    ap.add_argument("--request-timeout", type=float, default=120.0, help="client timeout of ordinary requests")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--api-key", default="soak-key")
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    ap.add_argument("--time-limit", type=float, default=1140.0, help="the whole run stops within this (s)")
    ap.add_argument("--reserve-s", type=float, default=90.0,
                    help="per phase, stop sending this long before its deadline (to check and stop the server)")
    ap.add_argument("--log-dir", default="/tmp/soak-logs")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.make_tiny_model:
        args.model = make_tiny_model(args.make_tiny_model)
    if not args.model:
        ap.error("--model or --make-tiny-model is required")
    os.makedirs(args.log_dir, exist_ok=True)
    out = asyncio.run(main_async(args))
    text = json.dumps(out, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(json.dumps(out["goals"], indent=2))
    if "rss_ratio_malformed_over_clean" in out:
        print(f"RSS ratio malformed/clean: {out['rss_ratio_malformed_over_clean']}")
    ok = all(v for g in out["goals"].values() for v in (g.values() if isinstance(g, dict) else [g]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
