"""LLMEngine: owns the tokenizer, scheduler and model runner; `step()` advances every request by one step."""

from __future__ import annotations

import logging
import time

import torch

from splitserve.config import EngineConfig
from splitserve.engine.block_manager import BlockManager
from splitserve.engine.detokenizer import IncrementalDetokenizer
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.sequence import Sequence
from splitserve.models.loader import load_hf_config, load_tokenizer, resolve_model
from splitserve.models.registry import arch_flags
from splitserve.outputs import CompletionOutput, RequestOutput
from splitserve.sampling_params import SamplingParams
from splitserve.worker.model_runner import ModelRunner

logger = logging.getLogger("splitserve")


class PromptTooLongError(ValueError):
    """The prompt leaves no room for a new token within max_model_len."""


class LLMEngine:
    def __init__(self, config: EngineConfig):
        t0 = time.perf_counter()
        self._init_frontend(config)
        self.pipeline_attention_sm = self._check_decode_pipeline_split()  # bad SM counts fail before any memory
        weights = None if config.load_format == "dummy" else self.model_path
        self.runner = ModelRunner(config, self.hf_config, weights)
        self._fit_max_model_len(self.runner.num_kv_blocks * config.kvcache_block_size)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, config.kvcache_block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, self.block_manager)
        self.decode_pipeline = self._plan_decode_pipeline()
        self.startup_time_s = time.perf_counter() - t0

    def _check_decode_pipeline_split(self) -> int | None:
        """The user's attention-partition size, checked against this GPU before any memory is taken
        (None: not given, so the planner calibrates candidate splits; or no pipeline)."""
        from splitserve.pipeline import green
        from splitserve.worker.model_runner import resolve_device

        device = resolve_device(self.config.device)
        if not (self.config.enable_decode_pipeline and device.type == "cuda"):
            return None
        total = torch.cuda.get_device_properties(device).multi_processor_count
        return green.check_split(self.config.decode_attention_sm, self.config.decode_ffn_sm, total)[0]

    def _plan_decode_pipeline(self) -> dict:
        """M2/M3 set-up and status: partitions, pipelined graphs, the calibrated plan, and why. A requested
        pipeline that cannot run, or that the planner never picks, says so once, with the path used."""
        from splitserve.pipeline import green, planner
        from splitserve.pipeline.profiling import StepProfiler

        cfg, runner = self.config, self.runner
        if cfg.decode_pipeline_profiling and runner.graphs:
            runner.profiler = StepProfiler()  # plain steps are profiled too: the baseline to compare with
        status = {"requested": cfg.enable_decode_pipeline, "active": False, "reason": "not requested"}
        if not cfg.enable_decode_pipeline:
            return status
        ok, reason = green.capability(runner.device)
        if ok and not runner.graphs:
            ok, reason = False, "enforce_eager=True, and the pipeline runs only as CUDA graphs"
        if ok:
            total = torch.cuda.get_device_properties(runner.device).multi_processor_count
            sms = [self.pipeline_attention_sm] if self.pipeline_attention_sm else planner.candidate_splits(total)
            try:
                runner.decode_planner, report = planner.build_planner(runner, cfg, sms)
                status.update(report)
            except RuntimeError as e:  # the driver refused a partition or a capture: plain graphs still run
                ok, reason = False, f"setting up the pipeline failed: {e}"
        if ok and not runner.pipeline_graphs:
            runner.decode_planner = None
            ok, reason = False, ("the planner measured plain CUDA graphs faster at every calibrated batch and "
                                 f"context\n{status['plan']}")
        status["reason"] = "planner: pipelined where measured faster" if ok else reason
        status["active"] = ok
        if ok:
            logger.info("decode plan (%s; cached in %s):\n%s", "from cache" if status["plan_cached"] else
                        f"calibrated in {status['calibration_s']} s", status["plan_file"], status["plan"])
        else:
            path = "plain CUDA graphs" if runner.graphs else (
                "eager (enforce_eager=True)" if cfg.enforce_eager else f"eager ({runner.device.type})")
            logger.warning("decode pipeline requested but not used: %s; decode runs %s", reason, path)
        return status

    def _init_frontend(self, config: EngineConfig) -> None:
        """Everything but the model: config, tokenizer, limits, request bookkeeping."""
        self.config = config
        self.model_path = resolve_model(config.model)
        hf_config = load_hf_config(self.model_path)
        arch_flags(hf_config)  # unsupported architectures fail here, before any weights are read
        self.hf_config = config.hf_config = hf_config
        self.tokenizer = load_tokenizer(self.model_path)
        self.vocab_size = hf_config.vocab_size
        model_max = int(getattr(hf_config, "max_position_embeddings", 0) or 2**31)
        self.user_max_model_len = config.max_model_len
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings "
                             f"{model_max}")
        config.max_model_len = config.max_model_len or model_max
        self.eos_token_ids = self._eos_ids()
        self.requests: dict[str, Sequence] = {}
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}
        self.num_steps = 0
        self.prefill_time_s = 0.0
        self.decode_time_s = 0.0

    def _fit_max_model_len(self, capacity: int) -> None:
        config = self.config
        if capacity < config.max_model_len:
            if self.user_max_model_len is not None:
                raise ValueError(f"max_model_len {self.user_max_model_len} does not fit the KV cache ({capacity} "
                                 "tokens); lower max_model_len or give the cache more memory")
            logger.info("max_model_len lowered from %d to the KV-cache capacity %d", config.max_model_len, capacity)
            config.max_model_len = capacity

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        sources = [getattr(self.hf_config, "eos_token_id", None)]
        try:
            from transformers import GenerationConfig

            sources.append(GenerationConfig.from_pretrained(self.model_path).eos_token_id)
        except OSError:
            pass
        if self.tokenizer is not None:
            sources.append(self.tokenizer.eos_token_id)
        for src in sources:
            ids.update([src] if isinstance(src, int) else (src or []))
        return ids

    # ---- requests ----
    def make_sequence(self, prompt, sampling_params: SamplingParams | None = None,
                      request_id: str | None = None) -> Sequence:
        """Tokenize and validate one request; raises ValueError naming the problem. Adds nothing."""
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        text = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer: pass prompts as token-id lists")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            token_ids = list(prompt)
            bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool)
                   or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        else:
            raise TypeError(f"a prompt must be str, list[int] or dict, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt is empty (no tokens)")
        if len(token_ids) >= self.config.max_model_len:
            raise PromptTooLongError(f"prompt has {len(token_ids)} tokens but max_model_len is "
                                     f"{self.config.max_model_len} (the prompt must leave room for one new token)")
        bad_stop = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad_stop:
            raise ValueError(f"stop_token_ids outside the vocabulary: {bad_stop}")
        return Sequence(token_ids, params, prompt=text, request_id=request_id)

    def chat_prompt(self, conversation: list[dict], add_generation_prompt: bool = True,
                    **template_kwargs) -> tuple[str, list[int]]:
        """A conversation rendered with the tokenizer's chat template: (text, token ids)."""
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("this model has no chat template")
        text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       **template_kwargs)
        return text, tok.encode(text, add_special_tokens=False)

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self.requests[seq.request_id] = seq
        self.detokenizers[seq.seq_id] = IncrementalDetokenizer(
            self.tokenizer, seq.prompt_token_ids, seq.sampling_params.skip_special_tokens)
        self.scheduler.add(seq)

    def add_request(self, prompt, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        seq = self.make_sequence(prompt, sampling_params, request_id)
        self.add_sequence(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        seq = self.requests.get(request_id)
        if seq is None or seq.is_finished:
            return False
        seq.finish_reason = "abort"
        self._finish(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ----
    def step(self) -> list[Sequence]:
        """Schedule, run the model once, append sampled tokens. Returns the sequences that got a token."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress: no request fits the KV cache")
            return []
        now = time.time()
        for seq in batch.seqs:
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
        t0 = time.perf_counter()
        tokens, logprobs, samples = self.runner.execute(batch)
        if batch.is_decode:
            self.decode_time_s += time.perf_counter() - t0
        else:
            self.prefill_time_s += time.perf_counter() - t0  # steps that carry any prefill tokens
        self.scheduler.complete_step(batch)
        self.num_steps += 1
        now = time.time()
        updated = []
        sampled_seqs = [s for s, flag in zip(batch.seqs, samples) if flag]
        for row, (seq, token) in enumerate(zip(sampled_seqs, tokens)):
            self._append_token(seq, token, row, logprobs, now)
            updated.append(seq)
        return updated

    def _append_token(self, seq: Sequence, token: int, row: int, logprobs, now: float) -> None:
        params = seq.sampling_params
        seq.token_ids.append(token)
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        seq.metrics.last_token_time = now
        seq.metrics.token_times.append(now)
        if logprobs is not None and seq.logprobs is not None:
            chosen, top = logprobs
            entry = {token: chosen[row]}
            if top is not None:
                values, indices = top
                entry.update({i: v for i, v in zip(indices[row][: params.logprobs], values[row][: params.logprobs])})
            seq.logprobs.append(entry)
            seq.cumulative_logprob += chosen[row]
        old_len = len(seq.output_text)
        seq.output_text += self.detokenizers[seq.seq_id].step(token)

        if not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", None
        elif token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        else:
            for stop in params.stop_list:
                idx = seq.output_text.find(stop, max(0, old_len - len(stop) + 1))
                if idx != -1:
                    seq.output_text = seq.output_text[:idx]
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    break
        if seq.finish_reason is None and (seq.num_output_tokens >= params.max_tokens
                                          or seq.num_tokens >= self.config.max_model_len):
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        seq.metrics.finished_time = time.time()
        self.scheduler.finish(seq)
        self.detokenizers.pop(seq.seq_id, None)

    def output_of(self, seq: Sequence) -> RequestOutput:
        completion = CompletionOutput(
            index=0, text=seq.output_text, token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            logprobs=seq.logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
        return RequestOutput(request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_token_ids,
                             outputs=[completion], finished=seq.is_finished, metrics=seq.metrics,
                             num_cached_tokens=seq.num_cached_tokens)

    def release(self, seq: Sequence) -> None:
        """Forget a finished request (after its output was taken)."""
        self.requests.pop(seq.request_id, None)

    def _decode_path(self) -> str:
        """The last decode step's path: "cuda_graph", "pipeline" or "eager" (before any step: the default)."""
        last = self.runner.last_decode_path or ("plain" if self.runner.graphs else "eager")
        return {"plain": "cuda_graph", "eager": "eager"}.get(last, "pipeline")

    def _decode_pipeline_stats(self) -> dict:
        out = dict(self.decode_pipeline)
        runner = self.runner
        if runner.decode_planner is not None:
            out["planner"] = runner.decode_planner.summary()
        if runner.profiler is not None:
            out["profile"] = runner.profiler.summary()
            out["profile_records"] = list(runner.profiler.records)[-256:]  # all kept: runner.profiler.records
        return out

    def stats(self) -> dict:
        bm = self.block_manager
        split = self.runner.split_of(self.runner.last_decode_path)
        return {
            "num_kv_blocks": bm.num_blocks, "kv_block_size": bm.block_size,
            "kv_used_blocks": bm.num_blocks - len(bm.free),
            "kv_cache_tokens": bm.num_blocks * bm.block_size, "kv_usage": bm.usage(),
            "prefix_cache_hit_tokens": bm.prefix_hit_tokens, "prefix_cache_query_tokens": bm.prefix_query_tokens,
            "num_preemptions": self.scheduler.num_preemptions, "num_steps": self.num_steps,
            "prefill_step_time_s": self.prefill_time_s, "decode_step_time_s": self.decode_time_s,
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "device": str(self.runner.device), "dtype": str(self.runner.dtype).replace("torch.", ""),
            "decode_path": self._decode_path(), "decode_pipeline": self._decode_pipeline_stats(),
            "decode_attention_sm": split[0], "decode_ffn_sm": split[1],  # the split in use (None while plain)
            "cuda_graphs": sorted(self.runner.graphs), "graph_capture_time_s": self.runner.graph_capture_time_s,
            "graph_memory_bytes": self.runner.graph_memory_bytes, "startup_time_s": self.startup_time_s,
        }
