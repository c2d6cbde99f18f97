"""ModelRunner: scheduled batch -> input tensors -> model -> sampled tokens.

Owns the model, the paged KV cache and, on CUDA, one decode CUDA graph per batch-size bucket.
Host-side preparation is vectorised with numpy: its cost grows with the number of sequences only
through one list concatenation, not through per-token Python loops.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from splitserve.config import EngineConfig
from splitserve.engine.scheduler import ScheduledBatch
from splitserve.engine.sequence import Sequence
from splitserve.layers.attention import AttentionMetadata, make_backend
from splitserve.layers.sampler import SamplingTensors, sample
from splitserve.models.llama import CausalLM
from splitserve.models.loader import load_weights
from splitserve.models.registry import arch_flags
from splitserve.worker.cpu_threads import set_cpu_threads

logger = logging.getLogger("splitserve")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available (use device='cpu')")
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
        dev = torch.device("cuda", index)
    return dev


def resolve_dtype(dtype: str, hf_config, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32  # bf16 matmuls on CPU are slow and inexact; fp32 is the CPU reference
    cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = _DTYPES.get(cfg_dtype)
    return cfg_dtype if cfg_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(hf_config, device: torch.device, dtype: torch.dtype, max_position: int,
                folder: str | None) -> CausalLM:
    """Model with weights from `folder`, or random weights (seeded by the caller) when folder is None."""
    with torch.device("meta"), _default_dtype(dtype):
        model = CausalLM(hf_config, arch_flags(hf_config), make_backend(device), max_position)
    model.to_empty(device=device)
    model.rotary.build(device)
    if folder is None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
    else:
        with torch.no_grad():
            load_weights(model, folder)
    return model.eval()


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, folder: str | None):
        self.config = config
        self.hf_config = hf_config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, hf_config, self.device)
        self.block_size = config.kvcache_block_size
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            self.cpu_threads = set_cpu_threads(config.cpu_threads)
        torch.manual_seed(config.seed)
        t0 = time.perf_counter()
        self.model = build_model(hf_config, self.device, self.dtype, config.max_model_len, folder)
        self.load_time_s = time.perf_counter() - t0
        attn = self.model.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.num_layers = len(self.model.layers)
        self.max_blocks_per_seq = -(-config.max_model_len // self.block_size)
        # M2: pipelined decode graphs by (path, bucket), the planner choosing between them and the plain
        # graphs, and per-step profiling; set up by the engine (pipeline.planner.build_planner).
        self.pipeline_graphs: dict[tuple[str, int], _PipelineGraph] = {}
        self.decode_planner = None
        self.profiler = None
        self.sm_partitions: dict = {}  # path -> pipeline.green.SMPartition of the pipelined graphs kept
        self.last_decode_path: str | None = None  # "plain", "pipeline:<SMs>" or "eager"
        self.num_kv_blocks = self._allocate_kv_cache()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # plain decode graphs by bucket
        self.graph_capture_time_s = 0.0
        self.graph_memory_bytes = 0
        if self.device.type == "cuda" and not config.enforce_eager:
            self._capture_decode_graphs()

    # ---- KV cache ----
    def kv_block_bytes(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def _allocate_kv_cache(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            num_blocks = cfg.num_kv_blocks
        elif self.device.type == "cpu":
            num_blocks = int(cfg.cpu_kv_cache_gib * 2**30) // self.kv_block_bytes()
        else:
            num_blocks = self._blocks_from_gpu_memory()
        if num_blocks < 1:
            raise RuntimeError("no memory left for the KV cache; lower max_num_batched_tokens or use a smaller model")
        self.kv_cache = torch.empty(2, self.num_layers, num_blocks, self.block_size, self.num_kv_heads,
                                    self.head_dim, dtype=self.dtype, device=self.device)
        self._bind_kv_cache(self.kv_cache)
        return num_blocks

    def _bind_kv_cache(self, kv_cache: torch.Tensor | None) -> None:
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.attn.k_cache = None if kv_cache is None else kv_cache[0, i]
            layer.self_attn.attn.v_cache = None if kv_cache is None else kv_cache[1, i]

    def _blocks_from_gpu_memory(self) -> int:
        """Run the largest prefill once to find peak activation memory, then give the rest to the KV cache."""
        cfg = self.config
        num_tokens = min(cfg.max_num_batched_tokens, cfg.max_model_len)
        blocks = -(-num_tokens // self.block_size)
        scratch = torch.empty(2, self.num_layers, blocks, self.block_size, self.num_kv_heads, self.head_dim,
                              dtype=self.dtype, device=self.device)
        self._bind_kv_cache(scratch)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        seq = Sequence([0] * num_tokens, _WARMUP_PARAMS)
        seq.block_table = list(range(blocks))
        self.execute(ScheduledBatch([seq], [num_tokens]))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - scratch.numel() * scratch.element_size()
        del scratch
        self._bind_kv_cache(None)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * cfg.gpu_memory_utilization - used_by_others - peak
        return int(budget) // self.kv_block_bytes()

    # ---- CUDA graphs for decode ----
    def graph_buckets(self) -> list[int]:
        limit = self.config.max_num_seqs
        buckets = [b for b in (1, 2, 4, 8) if b < limit] + list(range(16, limit, 16)) + [limit]
        return sorted(set(buckets))

    def _capture_decode_graphs(self) -> None:
        t0 = time.perf_counter()
        mem0 = torch.cuda.mem_get_info(self.device)[0]
        max_bs, width = self.config.max_num_seqs, self.max_blocks_per_seq
        # Static graph inputs, and pinned host mirrors so one step's inputs travel in three copies.
        self.graph_i64 = torch.zeros(3, max_bs, dtype=torch.int64, device=self.device)  # ids, positions, slots
        self.graph_seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=self.device)
        self.graph_tables = torch.zeros(max_bs, width, dtype=torch.int32, device=self.device)
        self.graph_query_start = torch.arange(max_bs + 1, dtype=torch.int32, device=self.device)
        self.stage_i64 = torch.zeros(3, max_bs, dtype=torch.int64).pin_memory()
        self.stage_seq_lens = torch.zeros(max_bs, dtype=torch.int32).pin_memory()
        self.stage_tables = torch.zeros(max_bs, width, dtype=torch.int32).pin_memory()
        self.graph_i64[2].fill_(-1)
        self.graph_outputs: dict[int, torch.Tensor] = {}
        self.graph_pool = torch.cuda.graph_pool_handle()  # one pool: graphs replay one at a time
        for bs in reversed(self.graph_buckets()):  # largest first so smaller graphs reuse its pool memory
            args = (self.graph_i64[0, :bs], self.graph_i64[1, :bs], self._graph_meta(bs))
            self.graphs[bs], self.graph_outputs[bs] = self._capture(self.model, args)
        torch.cuda.synchronize(self.device)
        self.graph_capture_time_s = time.perf_counter() - t0
        self.graph_memory_bytes = mem0 - torch.cuda.mem_get_info(self.device)[0]

    def _capture(self, forward, args) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        with torch.no_grad():
            forward(*args)  # warm up (Triton compiles, cuBLAS picks kernels and sets up its workspaces)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                output = forward(*args)
        return graph, output

    def capture_pipeline_graph(self, path: str, partition, bucket: int) -> None:
        """The pipelined decode step for `bucket` rows on `partition` (pipeline.green.SMPartition) as one
        graph: it forks onto the two partitions' streams and joins back, and keeps the partition it was
        captured on. With profiling, external events time every stage on each replay."""
        from splitserve.pipeline.pingpong import StageStreams, pipelined_forward

        t0 = time.perf_counter()
        streams = StageStreams(partition.attention_stream, partition.ffn_stream)
        stage_events = [] if self.config.decode_pipeline_profiling else None

        def forward(input_ids, positions, meta):
            if stage_events is not None:
                stage_events.clear()  # keep only the captured step's events
            return pipelined_forward(self.model, input_ids, positions, meta, 2, streams, stage_events)

        args = (self.graph_i64[0, :bucket], self.graph_i64[1, :bucket], self._graph_meta(bucket))
        graph, output = self._capture(forward, args)
        torch.cuda.synchronize(self.device)
        self.pipeline_graphs[(path, bucket)] = _PipelineGraph(graph, output, stage_events)
        self.graph_capture_time_s += time.perf_counter() - t0

    def drop_pipeline_graphs(self, keep: set[tuple[str, int]]) -> None:
        for key in [k for k in self.pipeline_graphs if k not in keep]:
            del self.pipeline_graphs[key]

    def free_device_memory(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.mem_get_info(self.device)[0]

    def _graph_for(self, path: str, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, list | None]:
        if path == "plain":
            return self.graphs[bucket], self.graph_outputs[bucket], None
        g = self.pipeline_graphs[(path, bucket)]
        return g.graph, g.output, g.stage_events

    def time_decode(self, path: str, bucket: int, ctx: int, iters: int = 5) -> float:
        """Median GPU time (ms) of one decode graph replay: `bucket` sequences of `ctx` cached tokens each.
        Block tables wrap around the whole KV cache, so the KV read is as large as a real batch's and
        does not sit in L2 (the KV content is whatever the cache holds: timing does not depend on it).
        Each replay writes one token per row into the cache: call it only while no request holds blocks
        (start-up calibration, benchmarks)."""
        bs, width = self.block_size, self.max_blocks_per_seq
        blocks = -(-(ctx + 1) // bs)
        if blocks > width:
            raise ValueError(f"context {ctx} does not fit max_model_len {self.config.max_model_len}")
        tables = (np.arange(bucket)[:, None] * blocks + np.arange(blocks)[None, :]) % self.num_kv_blocks
        self.graph_tables[:bucket, :blocks].copy_(torch.from_numpy(tables.astype(np.int32)))
        self.graph_seq_lens[:bucket].fill_(ctx + 1)
        self.graph_i64[0, :bucket].fill_(0)
        self.graph_i64[1, :bucket].fill_(ctx)
        self.graph_i64[2, :bucket].copy_(torch.from_numpy(tables[:, ctx // bs] * bs + ctx % bs))
        graph = self._graph_for(path, bucket)[0]
        times = []
        for i in range(iters + 2):  # two warm-up replays
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            if i >= 2:
                times.append(start.elapsed_time(end))
        return float(np.median(times))

    def _replay_decode_graph(self, host: dict[str, np.ndarray], num_seqs: int, bucket: int,
                             path: str = "plain") -> torch.Tensor:
        i64 = self.stage_i64.numpy()
        i64[:, num_seqs:bucket] = ((0,), (0,), (-1,))  # padding rows: token 0, no KV write, empty context
        i64[0, :num_seqs], i64[1, :num_seqs], i64[2, :num_seqs] = (
            host["input_ids"], host["positions"], host["slot_mapping"])
        lens = self.stage_seq_lens.numpy()
        lens[num_seqs:bucket] = 0
        lens[:num_seqs] = host["seq_lens"]
        tables = host["block_tables"]
        width = tables.shape[1]
        self.stage_tables.numpy()[:num_seqs, :width] = tables
        self.graph_i64[:, :bucket].copy_(self.stage_i64[:, :bucket], non_blocking=True)
        self.graph_seq_lens[:bucket].copy_(self.stage_seq_lens[:bucket], non_blocking=True)
        self.graph_tables[:num_seqs, :width].copy_(self.stage_tables[:num_seqs, :width], non_blocking=True)
        graph, output, stage_events = self._graph_for(path, bucket)
        if self.profiler is not None:
            self.profiler.start()
        graph.replay()
        self.last_decode_path = path
        if self.profiler is not None:
            attention_sm, ffn_sm = self.split_of(path)
            self.profiler.stop(path=path, num_seqs=num_seqs, bucket=bucket, mean_ctx=float(host["seq_lens"].mean()),
                               attention_sm=attention_sm, ffn_sm=ffn_sm, stage_events=stage_events)
        return output[:num_seqs]

    def split_of(self, path: str | None) -> tuple[int | None, int | None]:
        """(attention SMs, FFN SMs) of a decode path; (None, None) for the plain and eager paths."""
        partition = self.sm_partitions.get(path)
        return (partition.attention_sm, partition.ffn_sm) if partition is not None else (None, None)

    def _graph_meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.graph_i64[2, :bs], query_start_loc=self.graph_query_start[: bs + 1],
                                 seq_lens=self.graph_seq_lens[:bs], block_tables=self.graph_tables[:bs],
                                 max_query_len=1, max_seq_len=self.config.max_model_len)

    # ---- one step ----
    def prepare(self, batch: ScheduledBatch) -> dict[str, np.ndarray]:
        seqs, qlens = batch.seqs, np.asarray(batch.num_new_tokens, dtype=np.int64)
        starts = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=len(seqs))
        cu_q = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(qlens, out=cu_q[1:])
        num_tokens = int(cu_q[-1])
        token_ids = np.fromiter(
            (t for s, st, n in zip(seqs, starts, qlens) for t in s.token_ids[st:st + n]), dtype=np.int64,
            count=num_tokens)
        row = np.repeat(np.arange(len(seqs)), qlens)
        positions = np.arange(num_tokens, dtype=np.int64) - cu_q[:-1][row] + starts[row]
        width = max(len(s.block_table) for s in seqs)
        tables = np.zeros((len(seqs), width), dtype=np.int32)
        for i, s in enumerate(seqs):
            tables[i, : len(s.block_table)] = s.block_table
        bs = self.block_size
        slots = tables[row, positions // bs].astype(np.int64) * bs + positions % bs
        samples = np.asarray(batch.samples(), dtype=bool)
        return {"input_ids": token_ids, "positions": positions, "slot_mapping": slots,
                "query_start_loc": cu_q.astype(np.int32), "seq_lens": (starts + qlens).astype(np.int32),
                "block_tables": tables, "logits_indices": (cu_q[1:] - 1)[samples], "samples": samples}

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    @torch.no_grad()
    def execute(self, batch: ScheduledBatch):
        """Run one step. Returns (tokens for the sequences that sample, logprob info, sampled mask)."""
        host = self.prepare(batch)
        num_seqs = len(batch)
        bucket = self._bucket(num_seqs) if batch.is_decode else None
        if bucket is not None:
            path = "plain"
            if self.decode_planner is not None:  # M2/M3: plain or pipelined, and on which split
                path, bucket = self.decode_planner.choose(num_seqs, bucket, float(host["seq_lens"].mean()))
            hidden = self._replay_decode_graph(host, num_seqs, bucket, path)
        else:
            meta = AttentionMetadata(
                slot_mapping=self._to_device(host["slot_mapping"]),
                query_start_loc=self._to_device(host["query_start_loc"]),
                seq_lens=self._to_device(host["seq_lens"]),
                block_tables=self._to_device(host["block_tables"]),
                max_query_len=int(max(batch.num_new_tokens)), max_seq_len=int(host["seq_lens"].max()),
                query_start_loc_cpu=host["query_start_loc"].tolist(), seq_lens_cpu=host["seq_lens"].tolist())
            if batch.is_decode:
                self.last_decode_path = "eager"
            hidden = self.model(self._to_device(host["input_ids"]), self._to_device(host["positions"]), meta)
        samplers = [s for s, flag in zip(batch.seqs, host["samples"]) if flag]
        if not samplers:
            return [], None, host["samples"]
        if len(samplers) < num_seqs or bucket is None:  # gather the rows that sample (always all in decode)
            hidden = hidden[self._to_device(host["logits_indices"])]
        logits = self.model.compute_logits(hidden)
        tokens, logprob_info = sample(logits, self._sampling_tensors(samplers))
        tokens = tokens.tolist()  # syncs: the step's events can be read now
        if self.profiler is not None:
            self.profiler.collect()
        return tokens, _logprobs_to_host(logprob_info), host["samples"]

    def _bucket(self, num_seqs: int) -> int | None:
        if not self.graphs:
            return None
        for b in self.graph_buckets():
            if b >= num_seqs:
                return b
        return None

    def _sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        params = [s.sampling_params for s in seqs]
        want = [p.logprobs for p in params if p.logprobs is not None]
        if all(p.temperature == 0 for p in params):  # greedy: argmax only, no per-row tensors to upload
            return SamplingTensors(None, None, None, None, [], True, False, False, False,
                                   max(want) if want else None)
        dev = self.device
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        top_k = torch.tensor([max(p.top_k, 0) for p in params], dtype=torch.int64)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)
        generators = []
        for s in seqs:
            if s.sampling_params.seed is not None and s.generator is None:
                s.generator = torch.Generator(device=dev).manual_seed(s.sampling_params.seed)
            generators.append(s.generator)
        return SamplingTensors(
            temperature=temperature.to(dev), top_k=top_k.to(dev), top_p=top_p.to(dev), min_p=min_p.to(dev),
            generators=generators, all_greedy=all(p.temperature == 0 for p in params),
            any_top_k=any(p.top_k > 0 for p in params), any_top_p=any(p.top_p < 1 for p in params),
            any_min_p=any(p.min_p > 0 for p in params), max_logprobs=max(want) if want else None)


@dataclass
class _PipelineGraph:
    graph: torch.cuda.CUDAGraph
    output: torch.Tensor
    stage_events: list | None  # with profiling: the stage timing events recorded inside the graph


def _logprobs_to_host(info):
    if info is None:
        return None
    chosen, top = info
    top_host = (top.values.tolist(), top.indices.tolist()) if top is not None else None
    return chosen.tolist(), top_host


class _WarmupParams:
    temperature, top_k, top_p, min_p, seed, logprobs = 0.0, -1, 1.0, 0.0, None, None


_WARMUP_PARAMS = _WarmupParams()
