import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import sigint_as_in_a_terminal

from splitserve import cli

TEMPLATE_NOTE = "applying the model's chat template; --no-chat-template sends the raw text"


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "splitserve", *args], capture_output=True, text=True,
                          input=stdin, timeout=600)


def test_quick_start_command_answers(default_model_dir):
    """The README's Quick start command, as written: the default model answers the question."""
    res = run("generate", "What is the capital of France?")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
    assert res.stderr.count(TEMPLATE_NOTE) == 1


def test_generate_raw_text_without_chat_template(default_llm, monkeypatch, capsys):
    import splitserve

    made = []

    def shared_llm(model, **kwargs):  # the session's engine on the default model, instead of a second load
        made.append((model, kwargs))
        return default_llm

    monkeypatch.setattr(splitserve, "LLM", shared_llm)
    cli.main(["generate", "The capital of France is", "--no-chat-template", "--max-tokens", "8", "--device", "cpu"])
    out = capsys.readouterr()
    assert made == [(None, {"device": "cpu"})]
    assert "Paris" in out.out
    assert TEMPLATE_NOTE not in out.err


def test_generate_prompt_keeps_formatted_text(default_model_dir):
    from splitserve.models.loader import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    formatted = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert cli.generate_prompt(tok, formatted, True) == formatted
    assert cli.generate_prompt(tok, "Hi", False) == "Hi"
    ids = cli.generate_prompt(tok, "Hi", True)
    assert tok.decode(ids).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_generate_rejects_unknown_flag(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "hi", "--max-num-seq", "3"])
    assert info.value.code == 2 and "--max-num-seq" in capsys.readouterr().err


@pytest.mark.parametrize("command, args, message", [
    ("generate", ["--max-tokens", "-1", "hi"], "max_tokens must be an integer >= 1, got -1"),
    ("generate", ["--temperature", "-1", "hi"], "temperature must be >= 0"),
    ("generate", ["--top-p", "0", "hi"], "top_p must be in (0, 1]"),
    ("generate", ["--min-p", "2", "hi"], "min_p must be in [0, 1]"),
    ("generate", ["--max-num-seqs", "0", "hi"], "max_num_seqs must be a positive integer"),
    ("generate", ["--cpu-threads", "0", "hi"], "cpu_threads must be a positive integer"),
    ("generate", ["--dtype", "float8", "hi"], "dtype must be one of"),
    ("generate", [""], "the prompt is empty"),
    ("chat", ["--max-tokens", "0"], "max_tokens must be an integer >= 1, got 0"),
    ("generate", ["hi", "--json-schema", '{"type": "nope"}'], "--json-schema: invalid json schema"),
    ("generate", ["hi", "--json-schema", '{"type":'], "--json-schema: json schema is not valid JSON"),
    ("generate", ["hi", "--json-schema", "[1, 2]"], "--json-schema: json schema must be a JSON object"),
    ("generate", ["hi", "--json-schema", "@/nonexistent/schema.json"], "--json-schema: cannot read"),
    ("generate", ["hi", "--regex", "(ab"], "--regex: invalid regex"),
    ("generate", ["hi", "--choice", "yes", ""], "--choice: choice must be a list of 1 to"),
    ("generate", ["hi", "--regex", "a+", "--choice", "a"], "not allowed with argument"),
])
def test_bad_values_fail_before_any_model_load(monkeypatch, capsys, command, args, message):
    import splitserve
    from splitserve.models import loader

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(splitserve, "LLM", no_load)
    monkeypatch.setattr(loader, "resolve_model", no_load)
    with pytest.raises(SystemExit) as info:
        cli.main([command, *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "languages": {"type": "array", "items": {"enum": ["en", "fr", "de"]}, "maxItems": 3}}}


def _validate_person(value) -> None:
    """jsonschema's verdict when it is installed; else the same rules by hand."""
    try:
        import jsonschema
    except ImportError:
        assert isinstance(value, dict) and {"name", "age"} <= set(value) <= {"name", "age", "languages"}
        assert isinstance(value["name"], str) and 1 <= len(value["name"]) <= 24
        assert type(value["age"]) is int and 0 <= value["age"] <= 150
        langs = value.get("languages", [])
        assert isinstance(langs, list) and len(langs) <= 3 and set(langs) <= {"en", "fr", "de"}
        return
    jsonschema.validate(value, PERSON)


def _generate_on_shared_llm(default_llm, monkeypatch, capsys, *args: str):
    """`splitserve generate ...` in this process on the session's engine; returns (stdout, stderr)."""
    import splitserve

    monkeypatch.setattr(splitserve, "LLM", lambda model, **kwargs: default_llm)
    cli.main(["generate", *args, "--device", "cpu"])
    out = capsys.readouterr()
    return out.out, out.err


@pytest.mark.parametrize("how", ["inline, greedy", "@file, sampled"])
def test_generate_json_schema_output_parses_and_validates(default_llm, monkeypatch, capsys, tmp_path, how):
    if how.startswith("@"):
        path = tmp_path / "person.json"
        path.write_text(json.dumps(PERSON))
        flags = ["--json-schema", f"@{path}", "--temperature", "1", "--sampling-seed", "7"]
    else:
        flags = ["--json-schema", json.dumps(PERSON)]
    out, err = _generate_on_shared_llm(default_llm, monkeypatch, capsys, "Describe a famous scientist as JSON.",
                                       "--max-tokens", "96", *flags)
    _validate_person(json.loads(out))
    assert "may not parse" not in err


def test_generate_regex_and_choice(default_llm, monkeypatch, capsys):
    out, _ = _generate_on_shared_llm(default_llm, monkeypatch, capsys, "Give me a phone number.",
                                     "--regex", "[0-9]{3}-[0-9]{4}")
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}\n", out), out
    out, _ = _generate_on_shared_llm(default_llm, monkeypatch, capsys, "Is Paris in France?",
                                     "--choice", "yes", "no", "maybe")
    assert out in ("yes\n", "no\n", "maybe\n"), out


def test_generate_says_when_max_tokens_cut_the_structure(default_llm, monkeypatch, capsys):
    out, err = _generate_on_shared_llm(default_llm, monkeypatch, capsys, "Describe a scientist as JSON.",
                                       "--json-schema", json.dumps(PERSON), "--max-tokens", "3")
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    assert "reached --max-tokens before its grammar was complete" in err


def test_bad_json_schema_exits_non_zero_naming_the_flag():
    """A real process: the exit code and the message, before any model is loaded."""
    res = run("generate", "hi", "--json-schema", '{"type": "object", "properties": {"a": {"type": "nope"}}}')
    assert res.returncode == 2
    assert "splitserve: error: --json-schema: invalid json schema" in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_stop_on_interrupt_handler():
    """First Ctrl-C: the answer stops (a flag, no exception); second: KeyboardInterrupt; then the usual handler."""
    before = signal.getsignal(signal.SIGINT)
    with cli.StopOnInterrupt() as stop:
        assert not stop.stopped
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.stopped
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


class _Pipe:
    """Collects a child's stream on a thread; `wait_for` blocks until a text shows up after a position."""

    def __init__(self, stream):
        self.text, self._lock = "", threading.Lock()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        while chunk := stream.read1(256):
            with self._lock:
                self.text += chunk.decode(errors="replace")

    def wait_for(self, needle: str, start: int = 0, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                at = self.text.find(needle, start)
            if at >= 0:
                return at + len(needle)
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not seen within {timeout} s; got {self.text[start:]!r}")


@pytest.mark.slow  # a real session: model load, a streamed answer stopped by SIGINT, a second answer
def test_chat_ctrl_c_stops_the_answer_then_quits_at_the_prompt(default_model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "splitserve", "chat", "--max-tokens", "500", "--device", "cpu"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=sigint_as_in_a_terminal)
    out, err = _Pipe(proc.stdout), _Pipe(proc.stderr)
    try:
        at = out.wait_for("> ")
        proc.stdin.write(b"Write a long story about a dragon who learns to cook.\n")
        proc.stdin.flush()
        out.wait_for("", at + 20)  # 20 characters of the answer have streamed
        proc.send_signal(signal.SIGINT)
        err.wait_for("answer stopped; Ctrl-C at the prompt quits")
        at = out.wait_for("> ", at)
        assert proc.poll() is None, "the first Ctrl-C ended the session"
        proc.stdin.write(b"What is the capital of France?\n")
        proc.stdin.flush()
        at = out.wait_for("Paris", at)
        out.wait_for("> ", at)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err.text, err.text


def test_chat_uses_template(default_model_dir):
    res = run("chat", "--max-tokens", "16", stdin="What is the capital of France?\n\n")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def test_doctor_reports(capsys):
    cli.main(["doctor"])
    out = capsys.readouterr().out
    assert "torch" in out and "python" in out
    assert "two-GPU PD" in out


def test_doctor_reads_nvlink_topology(monkeypatch):
    import shutil

    from splitserve import doctor

    sample = ("\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\n"
              "GPU0\t X \tNV18\t0-63\t0\nGPU1\tNV18\t X \t0-63\t0\n\nLegend:\n  X    = Self\n")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=sample))
    assert doctor._topology() == {(0, 0): "X", (0, 1): "NV18", (1, 0): "NV18", (1, 1): "X"}
