"""Prometheus metrics of one server (own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from splitserve.engine.messages import CoreGauges
from splitserve.engine.request_state import RequestState

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        self.http_requests = Counter("splitserve_http_requests", "HTTP requests by endpoint and status code",
                                     ["endpoint", "status"], registry=r)
        self.requests_finished = Counter("splitserve_requests_finished", "Generation requests by finish reason",
                                         ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("splitserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("splitserve_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("splitserve_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("splitserve_inter_token_latency_seconds", "Time between output tokens",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("splitserve_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("splitserve_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("splitserve_num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("splitserve_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.preemptions = Gauge("splitserve_num_preemptions", "Preemptions since start", registry=r)
        self.decode_path = Gauge("splitserve_decode_path_info", "Decode path and SM split in use (value 1)",
                                 ["path", "memory_sm", "compute_sm"], registry=r)
        self.pd_decode_sm = Gauge("splitserve_pd_decode_sm", "PD multiplexing: SMs of the decode partition while a "
                                  "prefill runs beside decode (0: decode has the whole GPU)", registry=r)
        Gauge("splitserve_model_info", "Served model", ["model"], registry=r).labels(model_name).set(1)
        self._path_labels: tuple | None = None

    def on_step(self, g: CoreGauges) -> None:
        self.running.set(g.running)
        self.waiting.set(g.waiting)
        self.kv_usage.set(g.kv_usage)
        self.preemptions.set(g.num_preemptions)
        self.pd_decode_sm.set(g.pd_decode_sm or 0)
        labels = (g.decode_path, str(g.decode_memory_sm or ""), str(g.decode_compute_sm or ""))
        if labels != self._path_labels:
            if self._path_labels is not None:
                self.decode_path.remove(*self._path_labels)
            self.decode_path.labels(*labels).set(1)
            self._path_labels = labels

    def on_finish(self, seq: RequestState) -> None:
        m = seq.metrics
        self.requests_finished.labels(seq.finish_reason or "abort").inc()
        if seq.index == 0:  # a request's n completions share one prompt
            self.prompt_tokens.inc(seq.num_prompt_tokens)
        self.generation_tokens.inc(seq.num_output_tokens)
        if m.time_to_first_token is not None:
            self.ttft.observe(m.time_to_first_token)
        for gap in m.inter_token_latencies:
            self.inter_token.observe(gap)
        if m.last_token_time is not None:
            self.e2e.observe(m.last_token_time - m.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
