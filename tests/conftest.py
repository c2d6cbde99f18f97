import os
import shutil

import pytest
import torch

from splitserve.models.loader import resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def sigint_as_in_a_terminal() -> None:
    """preexec_fn for a child that a test stops with Ctrl-C: SIGINT's default action, whatever the test runner
    inherited (a shell's background job ignores SIGINT, and children inherit that, so Ctrl-C would do nothing)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    return resolve_model(None)


@pytest.fixture(scope="session")
def default_llm(default_model_dir):
    """One engine on the default model for the whole session (tests must leave it idle: no running requests)."""
    from splitserve import LLM

    llm = LLM()
    yield llm
    assert not llm.engine.has_unfinished_requests()


@pytest.fixture(scope="session")
def make_tiny_model(default_model_dir, tmp_path_factory):
    """Create a random-weight HF checkpoint (saved with transformers) sharing SmolLM2's tokenizer."""
    import transformers

    made: dict = {}

    def make(arch: str = "qwen3", seed: int = 0, max_shard_size: str | None = None, **overrides) -> str:
        key = (arch, seed, max_shard_size, repr(sorted(overrides.items(), key=str)))
        if key in made:
            return made[key]
        base = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.05,
                    bos_token_id=1, eos_token_id=2)
        base.update(overrides)
        if arch == "qwen3":
            cfg, cls = transformers.Qwen3Config(**base), transformers.Qwen3ForCausalLM
        elif arch == "llama":
            cfg, cls = transformers.LlamaConfig(**base), transformers.LlamaForCausalLM
        elif arch == "qwen2":
            base.pop("head_dim")
            cfg, cls = transformers.Qwen2Config(**base), transformers.Qwen2ForCausalLM
        else:
            raise ValueError(arch)
        torch.manual_seed(seed)
        model = cls(cfg).float()
        if getattr(cfg, "attention_bias", False) or arch == "qwen2":
            with torch.no_grad():  # make biases non-zero so that loading them is tested
                for name, p in model.named_parameters():
                    if name.endswith("bias"):
                        p.normal_(0, 0.05)
        path = str(tmp_path_factory.mktemp(f"tiny-{arch}"))
        model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        for name in TOKENIZER_FILES:
            src = os.path.join(default_model_dir, name)
            if os.path.exists(src):
                shutil.copy(src, path)
        made[key] = path
        return path

    return make


def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Reference: HF transformers greedy decoding in fp32, one prompt at a time (no padding effects)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            outs.append(y[0, len(ids):].tolist())
    return outs


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/status") as f:  # a zombie is dead too, but then nobody reaped it
        return "zombie" not in f.read()


def seconds_to_raise_after_kill(run, pid: int, after_s: float, error: type, match: str) -> float:
    """SIGKILL `pid` `after_s` seconds into `run()`, which must raise `error` matching `match`: the seconds from
    the kill to the raise."""
    import signal
    import threading
    import time

    killed_at = []

    def kill():
        killed_at.append(time.time())
        os.kill(pid, signal.SIGKILL)

    timer = threading.Timer(after_s, kill)
    timer.start()
    with pytest.raises(error, match=match):
        run()
    raised_at = time.time()
    timer.join()
    assert killed_at, "run() raised before the kill"
    return raised_at - killed_at[0]


def random_prompts(n: int, lo: int, hi: int, seed: int = 0, vocab: int = 49152) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (n_,), generator=g).tolist() for n_ in lens]


def watched_llm(model_dir: str, watch, **kw):
    """An LLM on the small KV cache the loop tests share (8-token blocks, 256 of them), with `llm.watch =
    watch(llm)`: the test module's spies."""
    from splitserve import LLM

    llm = LLM(model_dir, **{"kvcache_block_size": 8, "num_kv_blocks": 256, **kw})
    llm.watch = watch(llm)
    return llm


def watch_core_outputs(core, seen: dict) -> None:
    """Wrap an EngineCore's step and abort: no output carries a token after its request finished or was aborted
    (the front end's stop strings abort too), and no placeholder ever reaches an output. `seen["finished"]`
    collects the ended request ids."""
    from splitserve.engine.sequence import PLACEHOLDER

    seen.setdefault("finished", set())
    step, abort = core.step, core.abort

    def checked_step():
        outputs = step()
        for out in outputs:
            assert out.request_id not in seen["finished"], f"{out.request_id}: a token after its finish or abort"
            assert all(t >= 0 and t != PLACEHOLDER for t in out.new_token_ids), "a placeholder reached an output"
            if out.finish_reason is not None:
                seen["finished"].add(out.request_id)
        return outputs

    def watched_abort(request_ids):
        seen["finished"].update(request_ids)
        return abort(request_ids)

    core.step, core.abort = checked_step, watched_abort
