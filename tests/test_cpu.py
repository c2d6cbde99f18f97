"""The CPU path: its thread count, its independence from Triton, and the converted default model's cache."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.cli import build_parser, engine_kwargs
from splitserve.config import EngineConfig
from splitserve.worker import cpu_threads

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_auto_thread_count_leaves_half_the_cores():
    assert [cpu_threads.auto_cpu_threads(n) for n in (1, 2, 3, 4, 16, 64)] == [1, 1, 1, 2, 8, 8]


def test_cpu_threads_argument(make_tiny_model, keep_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with pytest.raises(ValueError, match="cpu_threads must be a positive integer"):
        EngineConfig(cpu_threads=0)
    assert engine_kwargs(build_parser().parse_args(["generate", "x", "--cpu-threads", "3"]))["cpu_threads"] == 3
    path = make_tiny_model("qwen3")
    llm = LLM(path, device="cpu", cpu_threads=2)
    assert torch.get_num_threads() == 2 and llm.engine.core.runner.cpu_threads == 2
    llm = LLM(path, device="cpu")
    assert torch.get_num_threads() == cpu_threads.auto_cpu_threads() == llm.engine.core.runner.cpu_threads
    assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 4


def test_omp_num_threads_is_kept(keep_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert cpu_threads.set_cpu_threads(None) == 2 == torch.get_num_threads()


NO_TRITON = r"""
import sys

class NoTriton:
    asked = []

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            NoTriton.asked.append(name)
            raise ModuleNotFoundError("No module named 'triton' (hidden by the test)", name=name)

sys.meta_path.insert(0, NoTriton())
from splitserve import LLM, SamplingParams
from splitserve.cli import build_parser
from splitserve.doctor import report

llm = LLM(sys.argv[1], device="cpu")
out = llm.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]
# The CPU path never even asks for Triton (nor for torch._dynamo, which asks for it and costs seconds)
assert not NoTriton.asked and "torch._dynamo" not in sys.modules, (NoTriton.asked, "torch._dynamo" in sys.modules)
rows = dict(report())
assert rows["triton"].startswith("not installed"), rows["triton"]
build_parser()
print("ok without triton")
"""


def test_cpu_path_runs_without_triton(make_tiny_model):
    res = subprocess.run([sys.executable, "-c", NO_TRITON, make_tiny_model("qwen3")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok without triton" in res.stdout


def test_default_model_cached_in_its_own_dtype(default_model_dir, default_llm):
    """The GGUF is cached in bf16 (about half the float32 size), under a versioned name; the CPU path computes in
    float32, upcast on load (test_parity compares it with HF on the same cached folder)."""
    from safetensors import safe_open

    from splitserve.models.loader import GGUF_CACHE_VERSION, default_model_gguf

    assert f"-v{GGUF_CACHE_VERSION}-" in os.path.basename(default_model_dir)
    with open(os.path.join(default_model_dir, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    files = glob.glob(os.path.join(default_model_dir, "*.safetensors"))
    with safe_open(files[0], framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"BF16"}
    assert sum(os.path.getsize(p) for p in files) < 3 * os.path.getsize(default_model_gguf())
    if default_llm.engine.core.runner.device.type == "cpu":
        assert {p.dtype for p in default_llm.engine.core.runner.model.parameters()} == {torch.float32}


def test_gguf_cache_dtype_follows_the_file_type():
    import gguf

    from splitserve.models.loader import gguf_cache_dtype

    kinds = gguf.LlamaFileType
    assert gguf_cache_dtype(int(kinds.ALL_F32)) == torch.float32
    assert gguf_cache_dtype(int(kinds.MOSTLY_F16)) == torch.float16
    assert gguf_cache_dtype(int(kinds.MOSTLY_BF16)) == torch.bfloat16
    assert gguf_cache_dtype(int(kinds.MOSTLY_Q4_1)) == torch.bfloat16  # the default model: quantized
    assert gguf_cache_dtype(None) == torch.bfloat16
