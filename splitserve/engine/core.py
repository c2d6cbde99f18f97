"""EngineCore: the scheduler and the model runner. Token ids in, token ids out; no text, no tokenizer.

`step()` schedules and launches one step, resolves the one before and returns a `CoreOutput` per request that
got a token (async scheduling, see `step`). The core
finishes a request on EOS, a stop token id, max_tokens or max_model_len; everything textual is the front
end's (engine.py). A PD worker (disagg/) runs one core each and moves sequences between them with
`detach` / `attach`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import torch

from splitserve.config import EngineConfig, ModelSpec
from splitserve.engine import gc_heap
from splitserve.engine.block_manager import BlockManager
from splitserve.engine.messages import CoreGauges, CoreOutput, CoreRequest
from splitserve.engine.scheduler import DECODE_LANE, ScheduledBatch, Scheduler, split_lanes
from splitserve.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from splitserve.engine.structured_output import BitmaskFill, StructuredOutputManager, accept_tokens
from splitserve.outputs import Logprob
from splitserve.pipeline.pd_multiplex import (
    PREFILL_LAYERS_PER_PIECE,
    PrefillRun,
    activation_pools,
    check_decode_sm,
    setup_pd_multiplex,
)
from splitserve.worker.decode_graphs import EAGER, PLAIN
from splitserve.worker.model_runner import LaunchedStep, ModelRunner, make_generator, resolve_device

logger = logging.getLogger("splitserve")


def fit_max_model_len(model: ModelSpec, capacity: int) -> int:
    """The max_model_len the KV cache can hold: the user's (an error if it does not fit), else lowered."""
    if capacity >= model.max_model_len:
        return model.max_model_len
    if model.max_model_len_given:
        raise ValueError(f"max_model_len {model.max_model_len} does not fit the KV cache ({capacity} tokens); "
                         "lower max_model_len or give the cache more memory")
    logger.info("max_model_len lowered from %d to the KV-cache capacity %d", model.max_model_len, capacity)
    return capacity


class EngineCore:
    def __init__(self, config: EngineConfig, model: ModelSpec):
        from splitserve.pipeline.setup import check_split, setup_decode_pipeline

        t0 = time.perf_counter()
        self.config, self.model = config, model
        device = resolve_device(config.device)
        memory_sm = check_split(config, device)  # before any memory is taken
        check_decode_sm(config, device)
        weights = None if config.load_format == "dummy" else model.path
        self.runner = ModelRunner(config, model.hf_config, model.max_model_len, weights,
                                  activation_pools(config, device))
        self.max_model_len = fit_max_model_len(model, self.runner.num_kv_blocks * config.kvcache_block_size)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, config.kvcache_block_size,
                                          config.enable_prefix_caching)
        self.decode_pipeline = setup_decode_pipeline(self.runner, config, memory_sm)
        self.lanes, self.pd_multiplex = setup_pd_multiplex(self.runner, config)  # lanes None: one mixed batch
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, self.block_manager,
                                   multiplex=self.lanes is not None)
        self.requests: dict[str, Sequence] = {}
        self.structured: StructuredOutputManager | None = None  # made by the first structured request
        self.compiling: list[tuple[Sequence, Callable[[Sequence], None]]] = []  # (sequence, its admission)
        self.vocab_size = model.hf_config.vocab_size
        self.runner.eos_token_ids = tuple(model.eos_token_ids)  # min_tokens masks them in the sampler
        # None: on (the in-process core, CUDA or CPU: same code; the CPU just has nothing to overlap).
        self.async_scheduling = config.async_scheduling is not False
        self.pending: LaunchedStep | None = None  # launched, not resolved yet (async scheduling)
        self.unsampled: LaunchedStep | None = None  # a structured step's forward, its sampling not enqueued yet
        self.mask_fill: BitmaskFill | None = None  # its grammar bitmask, filling in threads meanwhile
        self.prefill_pending: PrefillRun | None = None  # PD multiplexing: the prefill batch still running
        self.num_steps = 0
        self.prefill_time_s = 0.0
        self.decode_time_s = 0.0
        self.startup_time_s = time.perf_counter() - t0

    # ---- requests ----
    def add(self, request: CoreRequest) -> None:
        """Queue a request. Raises ValueError (nothing added) for an id in use or a request this core cannot
        run; the front end has checked the rest."""
        seq = self._sequence(request)
        self.requests[request.request_id] = seq
        self._admit(seq, self.scheduler.add)

    def _sequence(self, request: CoreRequest) -> Sequence:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(request.prompt_token_ids)} tokens but max_model_len is "
                             f"{self.max_model_len} (the prompt must leave room for one new token)")
        seq = Sequence(request.prompt_token_ids, request.sampling_params, request.request_id)
        source = self.requests.get(request.fork_of) if request.fork_of is not None else None
        if source is not None and source.prompt_token_ids == seq.prompt_token_ids:
            seq.fork_from = source  # the scheduler shares its prompt KV once it is computed
        if request.sampling_params.seed is not None:
            seq.generator = make_generator(request.sampling_params.seed, self.runner.device)
        return seq

    def _admit(self, seq: Sequence, admit: Callable[[Sequence], None]) -> None:
        """Admit now, or once its grammar has compiled (the compile runs in a thread meanwhile)."""
        if seq.sampling_params.structured_outputs is None:
            admit(seq)
            return
        if self.structured is None:
            self.structured = StructuredOutputManager(self.model.path, self.vocab_size, self.model.eos_token_ids,
                                                      self.runner.device)
        seq.grammar = self.structured.submit(seq.sampling_params.structured_outputs)
        self.compiling.append((seq, admit))

    def _admit_compiled(self) -> list[CoreOutput]:
        """Admit the sequences whose grammar is ready; end those whose compile failed (finish "abort")."""
        failed, waiting = [], []
        for seq, admit in self.compiling:
            try:
                ready = self.structured.make_ready(seq.grammar, seq.output_token_ids)
            except ValueError as e:
                logger.warning("request %s: %s", seq.request_id, e)
                seq.status, seq.grammar, seq.finish_reason = SequenceStatus.FINISHED, None, "abort"
                self.requests.pop(seq.request_id, None)
                self.block_manager.free_sequence(seq)  # a PD arrival holds blocks already
                failed.append(CoreOutput(seq.request_id, [], None, "abort", error=str(e)))
                continue
            if ready:
                admit(seq)
            else:
                waiting.append((seq, admit))
        self.compiling = waiting
        return failed

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            seq = self.requests.pop(request_id, None)
            if seq is None or seq.is_finished:
                continue
            seq.grammar = None  # frees the matcher
            compiling = next((c for c in self.compiling if c[0] is seq), None)
            if compiling is not None:
                self.compiling.remove(compiling)
                seq.status = SequenceStatus.FINISHED
                self.block_manager.free_sequence(seq)
            else:
                self.scheduler.finish(seq)  # its blocks may be in the pending step: safe, see _append
        if not self.has_unfinished():  # flush: every token still in flight belongs to a request that has ended
            self._sample_deferred()
            self._resolve()

    def has_unfinished(self) -> bool:
        """Requests to schedule, a prefill batch still running, or a pending step holding a token to deliver."""
        if self.scheduler.has_unfinished() or self.compiling or self.prefill_pending is not None:
            return True
        return any(self.requests.get(s.request_id) is s for step in (self.pending, self.unsampled) if step is not None
                   for s in step.samplers)

    def alive(self) -> bool:
        return True  # in this process: alive while the process is

    def shutdown(self) -> None:
        """Nothing to stop in-process but the grammar threads (the PD client stops its workers here)."""
        if self.mask_fill is not None:  # let it finish: the switch interval it lowered is restored then
            self.mask_fill, fill = None, self.mask_fill
            with contextlib.suppress(Exception):  # its error, if any, belongs to a step that will not run
                fill.result()
        if self.structured is not None:
            self.structured.shutdown()

    # ---- M1: a sequence moves from the prefill core to the decode core with its KV ----
    def detach(self, request_id: str) -> Sequence:
        """Take a running sequence out of this core; its blocks stay allocated until `free_blocks`. Only
        between synchronous steps (PD workers), where no step is pending."""
        assert self.pending is None is self.unsampled, "detach needs a synchronous core (async_scheduling=False)"
        seq = self.requests.pop(request_id)
        self.scheduler.remove(seq)
        return seq

    def free_blocks(self, seq: Sequence) -> None:
        self.block_manager.free_sequence(seq)  # full blocks stay in the prefix cache

    def attach(self, seq: Sequence) -> None:
        """Admit a sequence whose KV is already in its blocks (allocated here) into the running batch."""
        self.requests[seq.request_id] = seq
        self._admit(seq, self.scheduler.add_running)  # a structured one: its matcher replays its output first

    # ---- one step ----
    def step(self) -> list[CoreOutput]:
        """Schedule and launch step N + 1, then resolve step N while the device runs N + 1; returns step N's
        outputs (with async scheduling off: launch, then resolve the same step).

        While N is pending, its sequences hold a placeholder token (sequence.PLACEHOLDER) and N + 1 reads their
        input ids from N's token tensor on the device. Finishing on length is known at launch (such a sequence
        is not scheduled again); EOS, stop ids and the front end's stop strings only at resolve, so such a
        sequence may run one extra step whose token is dropped: no output ever carries a token past a stop.
        A grammar row's mask for N + 1 needs N's tokens on the host: a batch with grammar rows launches its
        forward only; N resolves after it as usual, N + 1's masks fill in threads while the front end runs and
        the next call schedules N + 2 and prepares its inputs; then it enqueues N + 1's sampling
        (`_sample_deferred`) and N + 2's forward behind it: the device runs a forward while the host resolves
        and runs the front end.
        Penalties take a pending token on the device and need nothing of the kind (worker/penalties.py). A
        profiled pipelined step resolves before the next launch (its stage events live in the graph)."""
        t0 = time.perf_counter()
        outputs: list[CoreOutput] = self._admit_compiled() if self.compiling else []
        if self.lanes is not None or (self.unsampled is not None and self.unsampled.needs_sync):
            self._sample_deferred()  # a prefill lane may read that step's tokens; a profiled step resolves now
        if self.pending is not None and self.pending.needs_sync:
            outputs += self._resolve()
        batch = self._schedule_lanes() if self.lanes is not None else self.scheduler.schedule()
        host = self.runner.prepare(batch) if batch.seqs else None  # host work beside the masks' fill
        self._sample_deferred()
        launched = self._launch(batch, host) if batch.seqs else None
        if launched is None and self.pending is None:
            if self.prefill_pending is not None:  # only a prefill batch is running: wait for it, then go on
                self._finish_prefill()
                return outputs
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress: no request fits the KV cache")
            if self.compiling and not outputs:
                self.structured.wait([seq.grammar for seq, _ in self.compiling], 0.01)
            return outputs
        # Step N; the device is already busy with N + 1, whose masks (if it has grammar rows) start filling as soon
        # as N's tokens are accepted.
        filled = self.pending is not None and launched is not None and not launched.sampled
        outputs += self._resolve(fill_next=launched if filled else None)
        if launched is not None:
            self.scheduler.register_blocks(launched.batch)  # after N: N + 1's inputs are real tokens now
            if launched.sampled:
                self.pending = launched
            else:
                self.unsampled = launched
            if not self.async_scheduling or not self.scheduler.has_unfinished():
                self._sample_deferred()  # synchronous, or nothing left to overlap with: flush
                outputs += self._resolve()
            elif not launched.sampled and not filled:  # no step resolved just now: its matchers are up to date
                self.mask_fill = self.structured.start_fill([s.grammar for s in launched.samplers])
        elapsed = time.perf_counter() - t0
        if launched is None or not launched.batch.is_decode:
            self.prefill_time_s += elapsed  # steps that launched prefill tokens (or only resolved)
        else:
            self.decode_time_s += elapsed
        return outputs

    # ---- PD multiplexing (issue 13): a prefill lane beside the decode lane ----
    def _schedule_lanes(self) -> ScheduledBatch:
        """Feed the running prefill batch its next pieces and finish it if the device is done with it, schedule,
        launch the prefill part (if no prefill batch runs) on the prefill partition, and return the decode part:
        `step` runs it as usual. A prefill batch runs on beside as many decode steps as it takes; its sequences
        wait meanwhile."""
        lanes, run = self.lanes, self.prefill_pending
        if run is not None:
            run.feed()
            if lanes.is_done(run):
                self._finish_prefill()
        batch = self.scheduler.schedule(prefill=self.prefill_pending is None)
        decode = ScheduledBatch([], [], lane=DECODE_LANE)
        for part in split_lanes(batch):
            if part.lane == DECODE_LANE:
                decode = part
            else:
                self._launch_prefill(part, decode)
        if self.runner.graphs is not None:
            self.runner.graphs.split_path = lanes.decode_path()
        if decode.seqs:
            lanes.count_decode(self.prefill_pending is not None)
        return decode

    def _launch_prefill(self, batch: ScheduledBatch, decode: ScheduledBatch) -> None:
        """Start a prefill batch on its stream (its first pieces enqueued now), beside `decode` (its split is
        chosen for that batch); it is busy until finished."""
        now = time.time()
        for seq in batch.seqs:
            if seq.scheduled_time is None:
                seq.scheduled_time = now
        mean_ctx = sum(s.num_computed_tokens for s in decode.seqs) / max(len(decode.seqs), 1)
        stream = self.lanes.start_prefill(len(decode), mean_ctx, None if self.pending is None else self.pending.tokens)
        pieces = self.runner.launch_in_pieces(batch, self.pending, PREFILL_LAYERS_PER_PIECE)
        self.prefill_pending = PrefillRun(batch, pieces, stream)
        self.prefill_pending.feed()  # its inputs are read now: `self.pending` is still the step they may need
        self.scheduler.advance(batch)
        self.scheduler.prefill_launched(batch)
        self.num_steps += 1

    def _finish_prefill(self) -> None:
        """The prefill batch is done (waits for it if not): prompt logprobs in, its blocks published for prefix
        caching, its sequences schedulable again (as decode rows once their prompt is computed but the last
        token, which the decode lane computes and samples from)."""
        run, self.prefill_pending = self.prefill_pending, None
        self._resolve_step(run.finish())
        self.scheduler.prefill_done()
        self.scheduler.register_blocks(run.batch)
        self.lanes.prefill_done()

    def _launch(self, batch: ScheduledBatch, host: dict | None = None) -> LaunchedStep:
        """Launch the batch (`host`: its inputs from `ModelRunner.prepare`, if made already); with grammar rows in
        it, its forward only (`_sample_deferred` enqueues the rest)."""
        now = time.time()
        for seq in batch.seqs:
            if seq.scheduled_time is None:
                seq.scheduled_time = now
        structured = any(seq.grammar is not None for seq in batch.seqs)
        step = self.runner.launch(batch, self.pending, defer_sampling=structured, host=host)
        self.scheduler.advance(batch)
        self.num_steps += 1
        positions = step.positions
        for seq in step.samplers:
            pos = seq.num_tokens
            positions.append(pos)
            seq.token_ids.append(PLACEHOLDER)
            if pos + 1 - seq.num_prompt_tokens >= seq.sampling_params.max_tokens or pos + 1 >= self.max_model_len:
                # Its last token: never scheduled again. It stays in self.requests until the token resolves.
                self.scheduler.finish(seq)
        # A profiled replay's stage events live in its graph: the next replay would re-record them before this
        # step's times are read, so a profiled step resolves before the next one launches.
        step.needs_sync = step.profiled
        return step

    def _sample_deferred(self) -> None:
        """Take the masks of the structured step launched last (filling since the step before it resolved, or
        filled now) and enqueue its sampling. The step it follows has resolved, so
        its bitmask copy from the shared pinned buffer has run before this fill writes there again."""
        step, self.unsampled = self.unsampled, None
        fill, self.mask_fill = self.mask_fill, None
        if step is not None:
            assert self.pending is None, "a deferred sampling follows a resolved step"
            if fill is None:
                fill = self.structured.start_fill([s.grammar for s in step.samplers])
            self.pending = self.runner.sample(step, fill.result())

    def _resolve(self, fill_next: LaunchedStep | None = None) -> list[CoreOutput]:
        """Resolve the pending step, if any: write its tokens over the placeholders, finish checks, outputs.
        `fill_next`: a launched structured step whose masks start filling once this step's tokens are accepted."""
        step, self.pending = self.pending, None
        if step is None:
            return []
        outputs = self._resolve_step(step, fill_next)
        if self.prefill_pending is not None and not self.lanes.is_done(self.prefill_pending):
            self.pd_multiplex["decode_done_while_prefill_ran"] += 1  # seen: the lanes overlap on the device
        return outputs

    def _resolve_step(self, step: LaunchedStep, fill_next: LaunchedStep | None = None) -> list[CoreOutput]:
        result = self.runner.resolve(step)
        if result.prompt_logprobs:
            for seq in step.batch.seqs:
                if seq.seq_id in result.prompt_logprobs and seq.prompt_logprobs is not None:
                    seq.prompt_logprobs += result.prompt_logprobs[seq.seq_id]
        logprobs = result.logprobs or [None] * len(step.samplers)
        live = [self.requests.get(seq.request_id) is seq for seq in step.samplers]  # else finished or aborted
        # The grammar rows' matchers take their tokens in one call (a Python call per row costs more than the work).
        rows = [i for i, (seq, alive) in enumerate(zip(step.samplers, live)) if alive and seq.grammar is not None]
        ends: dict[int, str] = {}  # row -> how its grammar ended it: "abort" (token refused) or "stop" (complete)
        if rows:
            matchers = [step.samplers[i].grammar.matcher for i in rows]
            for i, m, ok in zip(rows, matchers, accept_tokens(matchers, [result.tokens[i] for i in rows])):
                if not ok or m.is_terminated():
                    ends[i] = "stop" if ok else "abort"
        if fill_next is not None:  # the next step's masks need only the matchers: fill them beside the rest
            ended = {id(step.samplers[i]) for i in ends}
            self.mask_fill = self.structured.start_fill([None if id(s) in ended else s.grammar
                                                         for s in fill_next.samplers])
        outputs = []
        for i, (seq, pos, token, entry) in enumerate(zip(step.samplers, step.positions, result.tokens, logprobs)):
            seq.token_ids[pos] = token
            if live[i]:
                outputs.append(self._append(seq, pos, token, entry, ends.get(i)))
        return outputs

    def _append(self, seq: Sequence, pos: int, token: int, logprobs: dict[int, Logprob] | None,
                grammar_end: str | None = None) -> CoreOutput:
        """Finish checks and the output of one resolved token; `grammar_end`: "abort" when its grammar refused it,
        "stop" when it completed the grammar."""
        params = seq.sampling_params
        num_output = pos + 1 - seq.num_prompt_tokens  # a later step's placeholder may follow it already
        prompt_logprobs = None
        if seq.prompt_logprobs is not None and num_output == 1:
            prompt_logprobs = seq.prompt_logprobs  # complete now: handed out with the first token, once
        may_stop = num_output > params.min_tokens  # the sampler masks EOS / stop ids until then
        if grammar_end == "abort":  # cannot happen under the mask; say so if it does
            logger.error("request %s: its grammar rejected the sampled token %d", seq.request_id, token)
            seq.finish_reason = "abort"
        elif grammar_end == "stop":  # the grammar is complete (its EOS accepted)
            seq.finish_reason = "stop"
        elif may_stop and not params.ignore_eos and token in self.model.eos_token_ids:
            seq.finish_reason = "stop"
        elif may_stop and token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif num_output >= params.max_tokens or pos + 1 >= self.max_model_len:
            seq.finish_reason = "length"  # known at launch already (not scheduled since)
        if seq.finish_reason is not None:
            # A step launched after this one may still write this sequence's KV into the blocks freed here. Safe:
            # device work is stream-ordered, so whoever gets a block next writes (and reads) it after that step.
            seq.grammar = None
            self.scheduler.finish(seq)
            del self.requests[seq.request_id]
        return CoreOutput(seq.request_id, [token], None if logprobs is None else [logprobs], seq.finish_reason,
                          seq.stop_reason, seq.num_cached_tokens, seq.scheduled_time if num_output == 1 else None,
                          prompt_logprobs)

    # ---- reporting ----
    def gauges(self) -> CoreGauges:
        bm, path = self.block_manager, self.runner.last_decode_path or (PLAIN if self.runner.graphs else EAGER)
        split = path.kind == "pipeline"
        return CoreGauges(len(self.scheduler.running), len(self.scheduler.waiting), bm.usage(),
                          self.scheduler.num_preemptions, path.stats_name, path.memory_sm if split else None,
                          path.compute_sm if split else None, path.memory_sm if path.kind == "partition" else None)

    def stats(self) -> dict:
        bm, runner, graphs = self.block_manager, self.runner, self.runner.graphs
        gauges = self.gauges()
        return {
            "num_kv_blocks": bm.num_blocks, "kv_block_size": bm.block_size,
            "kv_used_blocks": bm.num_blocks - len(bm.free),
            "kv_cache_tokens": bm.num_blocks * bm.block_size, "kv_usage": gauges.kv_usage,
            "prefix_cache_hit_tokens": bm.prefix_hit_tokens, "prefix_cache_query_tokens": bm.prefix_query_tokens,
            "num_preemptions": gauges.num_preemptions, "num_steps": self.num_steps,
            "async_scheduling": self.async_scheduling, "pd_multiplex": dict(self.pd_multiplex),
            "prefill_step_time_s": self.prefill_time_s, "decode_step_time_s": self.decode_time_s,
            "running": gauges.running, "waiting": gauges.waiting, "max_model_len": self.max_model_len,
            "device": str(runner.device), "dtype": str(runner.dtype).replace("torch.", ""),
            "device_name": torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else "cpu",
            "decode_path": gauges.decode_path, "decode_pipeline": self.decode_pipeline.stats(graphs),
            "decode_memory_sm": gauges.decode_memory_sm, "decode_compute_sm": gauges.decode_compute_sm,
            "cuda_graphs": graphs.buckets if graphs else [],
            "sampler_graphs": runner.sampler_graphs.stats() if runner.sampler_graphs else None,
            "graph_capture_time_s": graphs.capture_time_s if graphs else 0.0,
            "graph_memory_bytes": graphs.memory_bytes if graphs else 0, "startup_time_s": self.startup_time_s,
            "gc_frozen_objects": gc_heap.frozen_objects,
        }
