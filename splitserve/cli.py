"""splitserve command line: generate | chat | serve | bench | doctor."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys

from splitserve.config import EngineConfig

_SKIP = {"model"}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    for f in dataclasses.fields(EngineConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool, "bool | None"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=None, help=f"default: {f.default}")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
            if f.name not in _SKIP and getattr(args, f.name, None) is not None}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--sampling-seed", type=int, default=None)
    parser.add_argument("--n", type=int, default=1, help="completions of the prompt (generate; printed one by one)")
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--min-tokens", type=int, default=0)
    parser.add_argument("--logit-bias", type=_logit_bias, default=None, metavar="JSON",
                        help='token id -> bias, e.g. \'{"50256": -100}\'')


def _logit_bias(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object of token id -> bias")
    return value


def add_structured_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("structured output (vLLM's structured_outputs; one of these)")
    one = group.add_mutually_exclusive_group()
    one.add_argument("--json-schema", default=None, metavar="JSON|@FILE",
                     help="the output is JSON that follows this schema: inline JSON, or @file.json to read a file")
    one.add_argument("--regex", default=None, help="the output matches this regular expression")
    one.add_argument("--choice", nargs="+", default=None, metavar="TEXT",
                     help="the output is one of these strings (give the prompt before this flag)")


def structured_params(args: argparse.Namespace):
    """The StructuredOutputsParams of --json-schema / --regex / --choice, or None. The schema, regex or choice is
    parsed here, before any model load; a bad one is a ValueError that names its flag."""
    given = [(flag, value) for flag, value in (("--json-schema", getattr(args, "json_schema", None)),
                                              ("--regex", getattr(args, "regex", None)),
                                              ("--choice", getattr(args, "choice", None))) if value is not None]
    if not given:
        return None
    from splitserve.engine import structured_output
    from splitserve.sampling_params import StructuredOutputsParams

    [(flag, value)] = given  # argparse keeps them exclusive
    try:
        if flag == "--json-schema":
            if value.startswith("@"):
                try:
                    with open(value[1:], encoding="utf-8") as f:
                        value = f.read()
                except (OSError, UnicodeDecodeError) as e:
                    raise ValueError(f"cannot read {value[1:]!r}: {getattr(e, 'strerror', None) or e}") from None
            params = StructuredOutputsParams(json=value)
        elif flag == "--regex":
            params = StructuredOutputsParams(regex=value)
        else:
            params = StructuredOutputsParams(choice=value)
        structured_output.check(params)  # xgrammar parses it; no tokenizer needed
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    return params


def sampling_params(args: argparse.Namespace):
    from splitserve.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          max_tokens=args.max_tokens, seed=args.sampling_seed,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          repetition_penalty=args.repetition_penalty, min_tokens=args.min_tokens,
                          logit_bias=args.logit_bias, n=args.n, structured_outputs=structured_params(args))


def checked_arguments(args: argparse.Namespace) -> tuple[dict, object]:
    """Engine arguments and sampling values, validated before anything is loaded: a bad value costs no model
    load. Returns (engine kwargs, SamplingParams); raises ValueError/TypeError naming the problem."""
    kwargs = engine_kwargs(args)
    EngineConfig.from_kwargs(args.model, **kwargs)
    return kwargs, sampling_params(args)


class StopOnInterrupt:
    """While an answer streams, the first Ctrl-C (SIGINT) stops it after the current engine step, leaving the
    engine consistent; a second one raises KeyboardInterrupt at once. Outside the block Ctrl-C acts as usual."""

    def __init__(self):
        self.stopped = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.stopped:
            raise KeyboardInterrupt
        self.stopped = True

    def __enter__(self):
        self.stopped = False
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: Ctrl-C keeps its usual meaning
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def stream(llm, prompt, params) -> tuple[str, bool, str | None]:
    """Print the answer as it is generated; returns (the full text, whether Ctrl-C stopped it, finish reason)."""
    engine = llm.engine
    request = engine.add_request(prompt, params)
    printed = 0
    with StopOnInterrupt() as interrupt:
        try:
            while not request.is_finished and not interrupt.stopped:
                engine.step()
                sys.stdout.write(request.output_text[printed:])
                sys.stdout.flush()
                printed = len(request.output_text)
        finally:
            engine.abort(request.request_id)
            engine.release(request)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return request.output_text, interrupt.stopped, request.finish_reason


def chat_prompt(tok, messages: list[dict]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def generate_prompt(tok, text: str, use_template: bool):
    """The user's text as one user turn of the model's chat template, when the model has one and the text is
    plain (it holds none of the tokenizer's special tokens); otherwise the raw text."""
    if not use_template or tok is None or not getattr(tok, "chat_template", None):
        return text
    if any(special and special in text for special in getattr(tok, "all_special_tokens", [])):
        return text  # already formatted by the user
    print("splitserve: applying the model's chat template; --no-chat-template sends the raw text", file=sys.stderr)
    return chat_prompt(tok, [{"role": "user", "content": text}])


def cmd_generate(args) -> None:
    if not args.prompt:
        raise ValueError("the prompt is empty")
    kwargs, params = checked_arguments(args)
    from splitserve import LLM

    llm = LLM(args.model, **kwargs)
    prompt = generate_prompt(llm.get_tokenizer(), args.prompt, args.chat_template)
    if params.n > 1:  # several answers: printed whole, one after the other
        outputs = llm.generate([prompt], params, use_tqdm=False)[0].outputs
        for completion in outputs:
            print(f"--- completion {completion.index} ({completion.finish_reason}) ---\n{completion.text}")
        _note_cut_structure(params, [c.finish_reason for c in outputs])
        return
    _, stopped, finish_reason = stream(llm, prompt, params)
    if stopped:
        print("splitserve: stopped (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    _note_cut_structure(params, [finish_reason])


def _note_cut_structure(params, finish_reasons: list[str | None]) -> None:
    """A structured output that ran out of --max-tokens may not parse: say so, on stderr."""
    if params.structured_outputs is not None and "length" in finish_reasons:
        print("splitserve: the output reached --max-tokens before its grammar was complete, so it may not "
              "parse; raise --max-tokens", file=sys.stderr)


def cmd_chat(args) -> None:
    kwargs, params = checked_arguments(args)
    if params.n > 1:
        raise ValueError("chat answers once per turn: --n must be 1 (generate takes --n)")
    from splitserve import LLM

    llm = LLM(args.model, **kwargs)
    tok = llm.get_tokenizer()
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError("chat needs a model whose tokenizer has a chat template; use generate instead")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("splitserve chat — Ctrl-C stops an answer; an empty line, Ctrl-D or Ctrl-C at the prompt quits",
          file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        answer, stopped, _ = stream(llm, chat_prompt(tok, messages), params)
        messages.append({"role": "assistant", "content": answer})
        if stopped:
            print("splitserve: answer stopped; Ctrl-C at the prompt quits", file=sys.stderr)


def cmd_doctor(args) -> None:
    from splitserve.doctor import main as doctor_main

    doctor_main(args.prefill_device_id, args.decode_device_id)


def serve_model(args: argparse.Namespace) -> str | None:
    """The model of `serve`: the positional MODEL (as `vllm serve MODEL`) or --model; both: they must agree."""
    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise ValueError(f"two models given: {args.model_tag!r} (positional) and --model {args.model!r}; "
                         "give one")
    return args.model_tag if args.model_tag is not None else args.model


def cmd_serve(args) -> None:
    from splitserve.server.api import serve

    args.model = serve_model(args)
    serve(args.model, engine_kwargs(args), host=args.host, port=args.port, api_key=args.api_key,
          served_model_name=args.served_model_name, log_level=args.log_level,
          max_request_body_bytes=args.max_request_body_bytes, max_waiting_requests=args.max_waiting_requests)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", allow_abbrev=False, help="generate text for one prompt, streamed to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                     help="send plain text as a user turn of the model's chat template, when it has one "
                          "(default); --no-chat-template sends the raw text")
    add_engine_args(gen)
    add_sampling_args(gen)
    add_structured_args(gen)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", allow_abbrev=False, help="interactive chat using the model's chat template")
    chat.add_argument("--system", default=None, help="system prompt")
    add_engine_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    srv = sub.add_parser("serve", allow_abbrev=False, help="OpenAI-compatible HTTP server")
    srv.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                     help="HF folder or .gguf file, as in `vllm serve MODEL` (same as --model; "
                          "default: SmolLM2-135M-Instruct)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    srv.add_argument("--served-model-name", default=None, help="model name clients use (default: folder name)")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.add_argument("--max-request-body-bytes", type=int, default=4 << 20,
                     help="larger bodies get 413 before they are read (default: 4 MiB)")
    srv.add_argument("--max-waiting-requests", type=int, default=1024,
                     help="prompts admitted at once (tokenizing, queued or generating); beyond: 429 (default: 1024)")
    add_engine_args(srv)
    srv.set_defaults(func=cmd_serve)
    from splitserve.bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub, add_engine_args)
    worker = sub.add_parser("pd-worker", add_help=False,
                            help="a PD worker (two hosts: the decode worker runs here, see README); --help: flags")
    worker.set_defaults(func=None)
    doctor = sub.add_parser("doctor", help="report Python, torch, CUDA, GPUs, Triton, P2P")
    doctor.add_argument("--prefill-device-id", type=int, default=None, help="GPU pair to check for two-GPU PD")
    doctor.add_argument("--decode-device-id", type=int, default=None)
    doctor.set_defaults(func=cmd_doctor)
    return parser


def _setup_logging(level: str) -> None:
    """The engine's own messages (decode plan, fallbacks, limits) on stderr; a library user configures
    logging themselves, as with any library."""
    log = logging.getLogger("splitserve")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s splitserve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(level.upper())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pd-worker"]:  # its own parser: it takes no engine flags (the coordinator sends them)
        from splitserve.disagg.worker import worker_cli

        return worker_cli(argv[1:])
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "log_level", "info"))
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"splitserve: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
