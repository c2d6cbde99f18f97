"""ModelRunner: scheduled batch -> input tensors -> model -> sampled tokens.

Owns the model, the paged KV cache and, on CUDA, the decode CUDA graphs (decode_graphs.py).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from splitserve.config import EngineConfig
from splitserve.engine.scheduler import ScheduledBatch
from splitserve.engine.sequence import PLACEHOLDER, Sequence
from splitserve.layers.attention import AttentionMetadata, make_backend
from splitserve.layers.sampler import SamplingTensors, sample, token_logprobs
from splitserve.models.llama import CausalLM
from splitserve.models.loader import load_weights
from splitserve.models.registry import arch_flags
from splitserve.outputs import Logprob
from splitserve.worker.cpu_threads import set_cpu_threads
from splitserve.worker.decode_graphs import EAGER, DecodeGraphs, DecodePath
from splitserve.worker.inputs import fake_batch, prepare_inputs
from splitserve.worker.penalties import PenaltyState
from splitserve.worker.sampler_graphs import SamplerGraphs

logger = logging.getLogger("splitserve")

PROMPT_LOGPROBS_SLICE = 256  # prompt positions whose logits are materialised at once ([256, V] float32)


class StepOutput(NamedTuple):
    tokens: list[int]  # one per sequence that samples this step, in batch order
    logprobs: list[dict[int, Logprob] | None] | None  # per sampled token, where its request asks for them
    samples: np.ndarray  # [num seqs] bool: which sequences sampled
    prompt_logprobs: dict[int, list[dict[int, Logprob]]]  # seq_id -> entries this step computed


class TopK(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


@dataclass
class LaunchedStep:
    """A step whose device work is enqueued: `resolve` waits for it and reads its results on the host. Every
    device-to-host copy it needs is enqueued at launch, so resolving never waits for a later step's work."""
    batch: ScheduledBatch
    samples: np.ndarray  # [num seqs] bool: which sequences sample
    samplers: list[Sequence]  # those sequences, in batch order
    tokens: torch.Tensor | None  # [len(samplers)] int64 on the device: the next step's inputs gather from it
    rows: dict[int, int]  # seq_id -> its row of `tokens`
    host: list  # host copies, readable once `event` has passed: tokens, then logprob info (chosen, rank, top)
    logprob_ks: list[int | None] | None  # per sampler, where any row asks for logprobs
    prompt_parts: list[tuple[int, list[int], tuple, int]]  # (seq_id, targets, host info, k) per slice
    event: torch.cuda.Event | None  # after the copies (None on CPU: copies are done at once)
    profiled: bool  # a decode-graph replay recorded a profiler record (collected at resolve)
    # The engine core's: where each sampler's placeholder sits in its token_ids, and whether this step must
    # resolve before the next one launches (a profiled replay: its stage events live in the graph).
    positions: list[int] = field(default_factory=list)
    needs_sync: bool = False
    # A step launched with its sampling deferred (`launch(..., defer_sampling=True)`): the logits and the
    # sampling inputs (built at launch, as for any step), until `sample` enqueues the rest.
    logits: torch.Tensor | None = None
    sampling: SamplingTensors | None = None

    @property
    def sampled(self) -> bool:
        return self.logits is None

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "half": torch.float16, "float": torch.float32}  # vLLM's aliases (EngineConfig normalises them too)


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
    def __init__(self, config: EngineConfig, hf_config, max_model_len: int, folder: str | None,
                 activation_pools: int = 1):
        """`max_model_len`: the longest sequence to build for (rotary tables, block tables); `folder`: the
        weights, or None for random weights; `activation_pools`: how many streams may each hold a prefill's
        activations at once (the caching allocator keeps one pool per stream), reserved before the KV cache."""
        self.activation_pools = activation_pools
        self.config = config
        self.hf_config = hf_config
        self.max_model_len = max_model_len
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, hf_config, self.device)
        self.block_size = config.kvcache_block_size
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            self.cpu_threads = set_cpu_threads(config.cpu_threads)
        torch.manual_seed(config.seed)
        t0 = time.perf_counter()
        self.model = build_model(hf_config, self.device, self.dtype, max_model_len, folder)
        self.load_time_s = time.perf_counter() - t0
        attn = self.model.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.num_layers = len(self.model.layers)
        self.eos_token_ids: tuple[int, ...] = ()  # set by the core: min_tokens masks them
        self.vocab_size = hf_config.vocab_size
        self.graphs: DecodeGraphs | None = None
        self.last_decode_path: DecodePath | None = None
        self.penalty_state: PenaltyState | None = None  # made on the first step with a count-based penalty
        self._batch_cache: _BatchRows | None = None  # the last batch's: see _batch_rows
        self.sampler_graphs: SamplerGraphs | None = None  # the sampling as CUDA graphs (made with the decode graphs)
        self.num_kv_blocks = self._allocate_kv_cache()  # runs one profiling prefill on CUDA
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = DecodeGraphs(self.model, self.device, config.max_num_seqs, max_model_len,
                                       self.block_size, self.num_kv_blocks, config.decode_pipeline_profiling)
            self.sampler_graphs = SamplerGraphs(self.device, self.vocab_size, self.graphs.buckets)

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
        num_tokens = min(cfg.max_num_batched_tokens, self.max_model_len)
        blocks = -(-num_tokens // self.block_size)
        scratch = torch.empty(2, self.num_layers, blocks, self.block_size, self.num_kv_heads, self.head_dim,
                              dtype=self.dtype, device=self.device)
        self._bind_kv_cache(scratch)
        # An engine dropped by its owner but caught in a reference cycle still holds its KV cache, and counts here
        # as this one's: collect it first (with cyclic garbage pending, a second LLM in one process found no room).
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self.execute(fake_batch(1, 0, self.block_size, blocks, num_new_tokens=num_tokens, token_id=0))
        torch.cuda.synchronize(self.device)
        activations = torch.cuda.max_memory_allocated(self.device) - base
        peak = base - scratch.numel() * scratch.element_size() + activations * self.activation_pools
        del scratch
        self._bind_kv_cache(None)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * cfg.gpu_memory_utilization - used_by_others - peak
        return int(budget) // self.kv_block_bytes()

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return self._upload(torch.from_numpy(array))

    def _upload(self, t: torch.Tensor) -> torch.Tensor:
        """Host tensor to the device without waiting: through pinned memory (the caching host allocator keeps
        the pinned block until the copy has run)."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy enqueued now, readable once the step's event has passed (pinned: the copy is async)."""
        if self.device.type != "cuda":
            return t
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t, non_blocking=True)
        return out

    def _info_to_host(self, info) -> tuple:
        chosen, rank, top = info
        top = None if top is None else TopK(self._to_host(top.values), self._to_host(top.indices))
        return self._to_host(chosen), self._to_host(rank), top

    # ---- one step ----
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        """Run one step synchronously (start-up profiling, benchmarks, scripts)."""
        return self.resolve(self.launch(batch))

    def prepare(self, batch: ScheduledBatch) -> dict[str, np.ndarray]:
        """A batch's host-side inputs (numpy; placeholders stay placeholders), for `launch`."""
        return prepare_inputs(batch, self.block_size)

    @torch.no_grad()
    def launch(self, batch: ScheduledBatch, prev: LaunchedStep | None = None, defer_sampling: bool = False,
               host: dict[str, np.ndarray] | None = None) -> LaunchedStep:
        """Enqueue one step on the device: inputs, forward, logits, sampling, and the copies of its results into
        pinned host memory, then an event. Nothing here waits for the device. Input tokens that are placeholders
        (sampled by `prev`, not resolved yet) are gathered from `prev`'s token tensor on the device.
        `defer_sampling`: stop after the logits; `sample` enqueues the rest (a structured-output step, whose
        bitmask needs `prev` resolved: the core fills it meanwhile, while the device runs this forward).
        `host`: the batch's `prepare` made earlier (the core makes it while a bitmask fills)."""
        if batch.block_copies:  # forked sequences' own copy of a shared, partly filled block
            src, dst = (self._to_device(np.asarray(c, dtype=np.int64)) for c in zip(*batch.block_copies))
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]
        host = self.prepare(batch) if host is None else host
        fill = self._pending_inputs(batch, host, prev)
        num_seqs = len(batch)
        choice = None
        if batch.is_decode and self.graphs is not None:  # M2/M3: plain or pipelined, and on which split
            choice = self.graphs.choose(num_seqs, float(host["seq_lens"].mean()))
        if choice is not None:
            hidden = self.graphs.replay(host, num_seqs, *choice, fill_ids=fill)
            self.last_decode_path = choice[0]
        else:
            if batch.is_decode:
                self.last_decode_path = EAGER
            hidden = self.model(*self._eager_inputs(batch, host, fill))
        profiled = choice is not None and self.graphs.profiler is not None
        prompt_parts = []
        if any(seq.prompt_logprobs is not None for seq in batch.seqs):
            prompt_parts = self._prompt_logprobs(batch, hidden, host["query_start_loc"])
        samplers = [s for s, flag in zip(batch.seqs, host["samples"]) if flag]
        step = LaunchedStep(batch, host["samples"], samplers, None, {s.seq_id: i for i, s in enumerate(samplers)},
                            [], None, prompt_parts, None, profiled)
        if samplers:
            if len(samplers) < num_seqs or choice is None:  # gather the rows that sample (always all in decode)
                hidden = hidden[self._to_device(host["logits_indices"])]
            out = None if self.sampler_graphs is None else self.sampler_graphs.logits_for(len(samplers))
            step.logits = self.model.compute_logits(hidden, out)
            # Built now, whether sampling is deferred or not: penalties and min_tokens read the token lists as
            # they are at launch (the core appends this step's placeholders next).
            step.sampling = self._sampling_tensors(samplers, prev)
        return step if defer_sampling and samplers else self.sample(step)

    @torch.no_grad()
    def sample(self, step: LaunchedStep, grammar: tuple[torch.Tensor, list[int]] | None = None) -> LaunchedStep:
        """Enqueue a launched step's sampling (if it has rows that sample), the host copies and its event.
        `grammar`: the structured-output (host bitmask, its rows) of `BitmaskFill.result`."""
        if step.logits is not None:
            st = step.sampling
            graphed = None if self.sampler_graphs is None else self.sampler_graphs.sample(step.logits, st, grammar)
            if graphed is not None:
                step.tokens, logprob_info = graphed, None
            else:
                if grammar is not None:
                    bitmask, rows = grammar
                    st.grammar_bitmask = bitmask.to(self.device, non_blocking=True)  # pinned on CUDA
                    # A mixed batch masks its grammar rows only. Their indices go up pinned as well: given a list,
                    # xgrammar copies it from pageable memory, a copy CUDA may make wait for the stream.
                    st.grammar_rows = (None if len(rows) == len(step.samplers)
                                       else self._to_device(np.asarray(rows, dtype=np.int32)))
                step.tokens, logprob_info = sample(step.logits, st)
            step.host.append(self._to_host(step.tokens))
            if logprob_info is not None:
                step.host += self._info_to_host(logprob_info)
                step.logprob_ks = [s.sampling_params.logprobs for s in step.samplers]
            step.logits = step.sampling = None
        step.event = self._record_event()
        return step

    def _eager_inputs(self, batch: ScheduledBatch, host: dict[str, np.ndarray], fill: Callable[[torch.Tensor], None]
                      | None) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input ids, positions, attention metadata) on the device for an eager forward."""
        meta = AttentionMetadata(
            slot_mapping=self._to_device(host["slot_mapping"]),
            query_start_loc=self._to_device(host["query_start_loc"]),
            seq_lens=self._to_device(host["seq_lens"]),
            block_tables=self._to_device(host["block_tables"]),
            max_query_len=int(max(batch.num_new_tokens)), max_seq_len=int(host["seq_lens"].max()),
            query_start_loc_cpu=host["query_start_loc"].tolist(), seq_lens_cpu=host["seq_lens"].tolist())
        input_ids = self._to_device(host["input_ids"])
        if fill is not None:
            fill(input_ids)
        return input_ids, self._to_device(host["positions"]), meta

    @torch.no_grad()
    def launch_in_pieces(self, batch: ScheduledBatch, prev: LaunchedStep | None,
                         layers_per_piece: int) -> Iterator[torch.cuda.Event | LaunchedStep | None]:
        """A batch that samples nothing (the PD-multiplex prefill lane), enqueued a few layers per `next()`: each
        yields the event after its piece (None on CPU), the last one the LaunchedStep. A whole long prefill
        enqueued at once fills the stream's launch queue, and the host then blocks in a launch until the device
        has worked most of it off; a piece at a time, the core's decode steps go on meanwhile."""
        assert not batch.block_copies and not any(batch.samples()), "launch_in_pieces: a batch that samples"
        host = self.prepare(batch)
        input_ids, positions, meta = self._eager_inputs(batch, host, self._pending_inputs(batch, host, prev))
        hidden, residual = self.model.embed_tokens(input_ids), None
        for start in range(0, self.num_layers, layers_per_piece):
            hidden, residual = self.model.run_layers(start, start + layers_per_piece, positions, hidden, residual,
                                                     meta)
            if start + layers_per_piece < self.num_layers:
                yield self._record_event()
        hidden, _ = self.model.norm(hidden, residual)
        prompt_parts = []
        if any(seq.prompt_logprobs is not None for seq in batch.seqs):
            prompt_parts = self._prompt_logprobs(batch, hidden, host["query_start_loc"])
        yield LaunchedStep(batch, host["samples"], [], None, {}, [], None, prompt_parts, self._record_event(), False)

    def _record_event(self) -> torch.cuda.Event | None:
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def resolve(self, step: LaunchedStep) -> StepOutput:
        """Wait for a launched step (its event only: later steps keep running) and read its results."""
        if step.event is not None:
            step.event.synchronize()
        if step.profiled:
            self.graphs.profiler.collect()
        prompt_logprobs: dict[int, list[dict[int, Logprob]]] = {}
        for seq_id, targets, info, k in step.prompt_parts:
            prompt_logprobs.setdefault(seq_id, []).extend(logprob_entries(targets, info, [k] * len(targets)))
        if not step.samplers:
            return StepOutput([], None, step.samples, prompt_logprobs)
        tokens = step.host[0].tolist()
        logprobs = None if step.logprob_ks is None else logprob_entries(tokens, step.host[1:], step.logprob_ks)
        return StepOutput(tokens, logprobs, step.samples, prompt_logprobs)

    def _pending_inputs(self, batch: ScheduledBatch, host: dict[str, np.ndarray],
                        prev: LaunchedStep | None) -> Callable[[torch.Tensor], None] | None:
        """A function writing the placeholder input ids (tokens `prev` sampled, still on the device) into a
        device tensor of the step's input ids, or None when every input id is on the host. A placeholder is
        always its row's only new token (a decode), so its token index is the row's start."""
        holes = np.flatnonzero(host["input_ids"] == PLACEHOLDER)
        if holes.size == 0:
            return None
        if prev is None or prev.tokens is None:
            raise RuntimeError("a placeholder input token without the step that samples it")
        rows = np.searchsorted(host["query_start_loc"][1:], holes, side="right")
        src = np.fromiter((prev.rows[batch.seqs[r].seq_id] for r in rows), dtype=np.int64, count=rows.size)
        k = holes.size
        if holes[-1] == k - 1 and src[-1] == k - 1 and np.array_equal(src, holes):  # steady decode: same rows
            return lambda ids: ids[:k].copy_(prev.tokens[:k])
        dst_dev, src_dev = self._to_device(holes), self._to_device(src)
        return lambda ids: ids.index_copy_(0, dst_dev, prev.tokens.index_select(0, src_dev))

    def _prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor,
                         query_start_loc: np.ndarray) -> list[tuple[int, list[int], tuple, int]]:
        """(seq_id, target ids, host logprob info, k) per slice of the prompt tokens this step's chunk predicts
        (position p predicts token p + 1), for the sequences that ask for prompt logprobs; `resolve` turns them
        into entries. Positions already done (a recompute after preemption) are skipped: those resolved before
        this sequence was scheduled again. Logits are taken a slice at a time: a whole chunk's [T, V] would be
        gigabytes."""
        out = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            k = seq.sampling_params.prompt_logprobs
            first = max(seq.num_computed_tokens, len(seq.prompt_logprobs or ()))
            last = min(seq.num_computed_tokens + n, seq.num_prompt_tokens - 1)
            if k is None or first >= last:
                continue
            row0 = int(query_start_loc[i]) - seq.num_computed_tokens
            for lo in range(first, last, PROMPT_LOGPROBS_SLICE):
                hi = min(lo + PROMPT_LOGPROBS_SLICE, last)
                logprobs = self.model.compute_logits(hidden[row0 + lo:row0 + hi]).float().log_softmax(dim=-1)
                targets = seq.token_ids[lo + 1:hi + 1]  # prompt tokens: never a placeholder
                info = token_logprobs(logprobs, self._to_device(np.asarray(targets, dtype=np.int64)), k)
                out.append((seq.seq_id, targets, self._info_to_host(info), k))
        return out

    def _batch_rows(self, seqs: list[Sequence]) -> _BatchRows:
        """The batch's per-request sampling inputs, kept while it is the same requests in the same rows."""
        kept = self._batch_cache
        if kept is None or kept.seqs != seqs:
            kept = self._batch_cache = _BatchRows(seqs, self._to_device)
        return kept

    def _sampling_tensors(self, seqs: list[Sequence], prev: LaunchedStep | None = None) -> SamplingTensors:
        kept = self._batch_rows(seqs)
        penalties = self._penalty_tensors(seqs, prev) if kept.any_penalty else {}
        return SamplingTensors(*kept.sampling, **penalties)

    def _penalty_tensors(self, seqs: list[Sequence], prev: LaunchedStep | None = None) -> dict:
        """The logit processors' inputs for this step. The min_tokens mask is a small list built here; logit_bias
        comes with the batch (`_BatchRows`); the [B, V] seen / count tensors of the repetition, frequency and
        presence penalties come from the runner's PenaltyState (worker/penalties.py), which scatters only the
        tokens added since the last step and rebuilds a sequence's row from its token ids whenever it cannot show
        the row is current (new sequence, PD hand-over, n > 1 child, changed tokens), so preemption and aborts
        need nothing from it."""
        kept = self._batch_rows(seqs)
        out: dict = {"any_penalty": True}
        ban_rows, ban_ids = [], []
        for r, seq in kept.min_tokens:
            p = seq.sampling_params
            if seq.num_output_tokens < p.min_tokens and seq.grammar is None:  # a grammar says where EOS may go
                stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
                ban_rows += [r] * len(stop_ids)
                ban_ids += stop_ids
        if kept.bias is not None:
            out["bias"] = kept.bias
        if ban_rows:
            out["banned"] = (self._to_device(np.asarray(ban_rows, dtype=np.int64)),
                             self._to_device(np.asarray(ban_ids, dtype=np.int64)))
        if kept.any_rep or kept.any_count:
            state = self.penalty_state
            if state is None:
                state = self.penalty_state = PenaltyState(self.vocab_size, self.device)
            pending = None if prev is None else (prev.tokens, prev.rows)
            seen, counts = state.rows_for(seqs, kept.used, self._to_device, pending)
            if kept.any_rep:
                out["seen"], out["repetition"] = seen, kept.factors[0]
            if kept.any_count:
                out["counts"], out["frequency"], out["presence"] = counts, kept.factors[1], kept.factors[2]
        return out


class _BatchRows:
    """A batch's sampling inputs that depend on its requests only: the per-row tensors of temperature, top-k,
    top-p and min-p, the generators, which rows want logprobs, which use which logit processor, the logit_bias
    entries and the penalty factors. Rebuilt and uploaded every step they cost the decode loop host time; kept
    while the batch is the same requests in the same rows (it keeps them alive: their ids stay theirs)."""

    def __init__(self, seqs: list[Sequence], to_device: Callable[[np.ndarray], torch.Tensor]):
        self.seqs = list(seqs)
        params = [s.sampling_params for s in seqs]
        want = [p.logprobs for p in params if p.logprobs is not None]
        max_logprobs = max(want) if want else None
        if all(p.temperature == 0 for p in params):  # greedy: argmax only, no per-row tensors to upload
            self.sampling = (None, None, None, None, [], True, 0, False, False, max_logprobs, True)
        else:  # SamplingTensors' fields, in order; pinned uploads: a pageable one may wait for the stream
            self.sampling = (
                to_device(np.array([p.temperature for p in params], dtype=np.float32)),
                to_device(np.array([max(p.top_k, 0) for p in params], dtype=np.int64)),
                to_device(np.array([p.top_p for p in params], dtype=np.float32)),
                to_device(np.array([p.min_p for p in params], dtype=np.float32)),
                [s.generator for s in seqs], False, max(max(p.top_k, 0) for p in params),
                any(p.top_p < 1 for p in params), any(p.min_p > 0 for p in params), max_logprobs,
                any(p.temperature == 0 for p in params))
        self.any_penalty = any(p.has_penalties for p in params)
        # logit_bias: (rows, token ids, biases); up to 1,024 entries per row, a long list to build every step
        biased = [(r, p) for r, p in enumerate(params) if p.logit_bias]
        self.bias = None
        if biased:
            rows, ids, values = [], [], []
            for r, p in biased:
                rows += [r] * len(p.logit_bias)
                ids += p.logit_bias.keys()
                values += p.logit_bias.values()
            self.bias = (to_device(np.asarray(rows, dtype=np.int64)), to_device(np.asarray(ids, dtype=np.int64)),
                         to_device(np.asarray(values, dtype=np.float32)))
        self.min_tokens = [(r, s) for r, s in enumerate(seqs) if s.sampling_params.min_tokens > 0]
        rep = [p.repetition_penalty != 1 for p in params]
        count = [p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params]
        self.used = [a or b for a, b in zip(rep, count)]
        self.any_rep, self.any_count = any(rep), any(count)
        self.factors = None
        if self.any_rep or self.any_count:
            self.factors = to_device(np.array([[p.repetition_penalty for p in params],
                                               [p.frequency_penalty for p in params],
                                               [p.presence_penalty for p in params]], dtype=np.float32))


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A request's own random stream. Raises ValueError for a seed torch cannot take."""
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except (RuntimeError, OverflowError, ValueError) as e:
        raise ValueError(f"seed {seed} cannot seed a generator: {e}") from None


def logprob_entries(token_ids: list[int], info, ks: list[int | None]) -> list[dict[int, Logprob] | None]:
    """Per row: {its token: Logprob, then the top-k tokens: Logprob}, or None where the row wants none."""
    chosen, rank, top = info
    chosen, rank = chosen.tolist(), rank.tolist()
    top_values, top_ids = (top.values.tolist(), top.indices.tolist()) if top is not None else ((), ())
    entries = []
    for r, (token, k) in enumerate(zip(token_ids, ks)):
        if k is None:
            entries.append(None)
            continue
        entry = {token: Logprob(chosen[r], rank[r])}
        for j in range(k):
            entry.setdefault(top_ids[r][j], Logprob(top_values[r][j], j + 1))
        entries.append(entry)
    return entries
