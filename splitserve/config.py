"""EngineConfig: every engine argument in one frozen dataclass, validated once.

It holds only what the user gave (or the defaults). What the engine works out from it — the model's
folder and config, the max_model_len that fits the KV cache — lives in `ModelSpec` and on the engine
core, never written back here, so a config can be sent to a worker and mean the same thing there.
Argument names follow vLLM / nano-vllm so that scripts port by changing the import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DTYPES = ("auto", "bfloat16", "float16", "float32")
# vLLM's other names for the same dtypes (its --dtype accepts "half" and "float"); the config keeps the
# canonical name, so everything downstream sees one of DTYPES.
DTYPE_ALIASES = {"half": "float16", "float": "float32"}


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    kvcache_block_size: int = 16
    device: str = "auto"  # "auto" | "cuda" | "cuda:N" | "cpu"
    dtype: str = "auto"  # "auto": the checkpoint's dtype on CUDA, float32 on CPU
    seed: int = 0
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None  # fixes the KV-cache size instead of sizing it from memory
    cpu_kv_cache_gib: float = 2.0  # KV-cache budget on CPU, where there is no memory fraction to use
    cpu_threads: int | None = None  # torch threads for CPU inference; None: auto (docs/CPU-THREADS.md)
    load_format: str = "auto"  # "auto": weights from the checkpoint; "dummy": random weights (benchmarks)
    # M1: prefill and decode in two worker processes, one per device, KV moved over torch.distributed.
    enable_two_gpu_pd: bool = False
    prefill_device_id: int | None = None  # CUDA ids; None: 0 and 1 on GPUs, nothing on CPU
    decode_device_id: int | None = None
    pd_decode_num_kv_blocks: int | None = None  # KV blocks of the decode worker (default: sized from memory)
    pd_max_pending: int = 64  # prefilled sequences that may wait for decode-side room before prefill pauses
    pd_verify_kv: bool = False  # hash every transferred KV buffer on both sides and compare (tests, debugging)
    pd_remote_decode: str | None = None  # "HOST:PORT" to listen on for a decode worker started on another host
    # M2: decode pipeline over two green-context SM partitions: memory (rotary, KV write, paged attention) |
    # compute (every GEMM and norm).
    enable_decode_pipeline: bool = False
    decode_memory_sm: int | None = None  # SMs of the memory partition (multiple of 8); None: planner
    decode_compute_sm: int | None = None  # SMs of the compute partition; None: the rest
    decode_pipeline_profiling: bool = False  # record per-step path, split and stage times
    # Schedule and launch step N + 1 before reading step N's tokens back (vLLM v1's default). None: on where
    # supported (the in-process core; PD workers step synchronously).
    async_scheduling: bool | None = None
    # The engine core (scheduler + model runner) in a process of its own, the front end in this one (vLLM v1's
    # split; engine/core_client.py): the two run in parallel instead of taking turns on one GIL.
    engine_core_process: bool = False
    # Issue 13: prefill ‖ decode on one GPU over one KV cache. Each step schedules a decode batch (1 token per
    # running sequence whose prompt is done) and a prefill batch (prompt chunks) as two launches ("lanes").
    # Until the GPU part lands (green-context partitions) the lanes run one after the other, synchronously.
    enable_pd_multiplex: bool = False
    pd_decode_sm: int | None = None  # SMs of the decode partition (multiple of 8); None: the planner (GPU part)
    pd_itl_target_ms: float | None = None  # decode step target the split keeps; None: from calibration

    @classmethod
    def from_kwargs(cls, model: str | None = None, **engine_args) -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls) if f.name != "model"}
        unknown = sorted(set(engine_args) - known)
        if unknown:
            raise TypeError(
                f"unknown engine argument(s): {', '.join(unknown)}; known arguments are: {', '.join(sorted(known))}"
            )
        return cls(model=model, **engine_args)

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("max_num_seqs", "max_num_batched_tokens", "kvcache_block_size", "pd_max_pending"):
            positive_int(name)
        if self.max_model_len is not None:
            positive_int("max_model_len")
        if self.num_kv_blocks is not None:
            positive_int("num_kv_blocks")
        if self.cpu_threads is not None:
            positive_int("cpu_threads")
        if not 0.0 < float(self.gpu_memory_utilization) <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not float(self.cpu_kv_cache_gib) > 0:
            raise ValueError(f"cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if isinstance(self.dtype, str) and self.dtype in DTYPE_ALIASES:  # frozen: set the canonical name once
            object.__setattr__(self, "dtype", DTYPE_ALIASES[self.dtype])
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES + tuple(DTYPE_ALIASES)}, got {self.dtype!r}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {dev!r}")
        for name in ("prefill_device_id", "decode_device_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.pd_decode_num_kv_blocks is not None:
            positive_int("pd_decode_num_kv_blocks")
        if self.enable_two_gpu_pd and self.prefill_device_id is not None \
                and self.prefill_device_id == self.decode_device_id:
            raise ValueError(f"prefill_device_id and decode_device_id must differ for enable_two_gpu_pd "
                             f"(both are {self.prefill_device_id})")
        from splitserve.pipeline.green import check_sm_count

        check_sm_count("decode_memory_sm", self.decode_memory_sm)
        check_sm_count("decode_compute_sm", self.decode_compute_sm)
        if not self.enable_decode_pipeline and (self.decode_memory_sm is not None
                                                or self.decode_compute_sm is not None):
            raise ValueError("decode_memory_sm / decode_compute_sm need enable_decode_pipeline=True")
        self._check_pd_multiplex()
        if not isinstance(self.engine_core_process, bool):
            raise ValueError(f"engine_core_process must be True or False, got {self.engine_core_process!r}")
        if self.engine_core_process and self.enable_two_gpu_pd:
            raise ValueError("engine_core_process and enable_two_gpu_pd cannot be combined: the two-GPU split "
                             "already runs its cores in worker processes")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be True, False or None, got {self.async_scheduling!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def _check_pd_multiplex(self) -> None:
        import math

        from splitserve.pipeline.green import check_sm_count

        if not isinstance(self.enable_pd_multiplex, bool):
            raise ValueError(f"enable_pd_multiplex must be True or False, got {self.enable_pd_multiplex!r}")
        check_sm_count("pd_decode_sm", self.pd_decode_sm)
        if self.pd_itl_target_ms is not None:
            value = self.pd_itl_target_ms
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"pd_itl_target_ms must be a finite number of milliseconds > 0, got {value!r}")
        if (self.pd_decode_sm is not None or self.pd_itl_target_ms is not None) and not self.enable_pd_multiplex:
            raise ValueError("pd_decode_sm / pd_itl_target_ms need enable_pd_multiplex=True")
        if self.enable_pd_multiplex and self.enable_two_gpu_pd:
            # Supportable later (prefill GPU + a split decode GPU), but the decode worker has no lanes yet.
            raise ValueError("enable_pd_multiplex and enable_two_gpu_pd cannot be combined: the two-GPU split "
                             "already runs prefill and decode apart; use one of them")
        if self.enable_pd_multiplex and self.enable_decode_pipeline:
            raise ValueError("enable_pd_multiplex and enable_decode_pipeline cannot be combined: both split the "
                             "GPU's SMs into green-context partitions; use one of them")
        # enforce_eager is accepted: on CPU it changes nothing; on a GPU the partitioned decode needs CUDA
        # graphs, so the mode falls back to the sequential lanes with a WARNING (engine/core.py).


@dataclass(frozen=True)
class ModelSpec:
    """The model as resolved once per process from `EngineConfig.model` (models.loader.resolve_model_spec)."""
    path: str  # HF-style folder (a GGUF file is converted once into a cached one)
    hf_config: object
    max_model_len: int  # the user's max_model_len, else the model's max_position_embeddings
    max_model_len_given: bool  # the user's: the KV cache must hold it (else it is lowered to fit)
    eos_token_ids: frozenset[int]
