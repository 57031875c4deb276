"""Prometheus metrics of one server (its own registry: no global state)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fastinfer.outputs import RequestOutput

_LAT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector:
    """Gauges (and the MoE routing counters) read from the engine at scrape time."""

    def __init__(self, get_engine: Callable[[], Any], model: str) -> None:
        self.get_engine, self.model = get_engine, model

    def collect(self):
        a = self.get_engine()
        if a is None:
            return
        s = a.engine.scheduler.stats()
        spec = a.engine.spec_summary()
        for name, doc, value in (
            ("fastinfer_num_requests_running", "Requests in the running batch", s.num_running),
            ("fastinfer_num_requests_waiting", "Requests waiting to be scheduled (queue length)", s.num_waiting),
            ("fastinfer_kv_cache_usage_perc", "Fraction of KV-cache blocks in use", s.kv_usage),
            ("fastinfer_num_preemptions_total", "Requests preempted (recomputed later)", s.num_preemptions),
            ("fastinfer_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache", s.prefix_queries),
            ("fastinfer_prefix_cache_hits_total", "Prompt tokens found in the prefix cache", s.prefix_hits),
            ("fastinfer_prefix_cache_blocks", "KV blocks currently held by the prefix cache", s.num_cached_blocks),
            ("fastinfer_prefix_cache_evictions_total", "Cached KV blocks evicted", s.num_evictions),
            ("fastinfer_requests_in_flight", "Requests admitted and not finished", a.num_in_flight),
            ("fastinfer_spec_decode_draft_tokens_total", "Draft tokens verified", a.engine.spec_stats["draft_tokens"]),
            ("fastinfer_spec_decode_accepted_tokens_total", "Draft tokens accepted",
             a.engine.spec_stats["accepted_tokens"]),
            ("fastinfer_spec_decode_steps_total", "Request-steps that verified drafts", a.engine.spec_stats["steps"]),
            ("fastinfer_spec_decode_draft_time_seconds_total", "Time spent proposing drafts (draft model, n-gram)",
             spec["draft_time_s"]),
            ("fastinfer_spec_decode_verify_time_seconds_total", "Time of the target steps that verified drafts",
             spec["verify_time_s"]),
            ("fastinfer_spec_decode_acceptance_rate", "Fraction of draft tokens accepted", spec["acceptance_rate"]),
            ("fastinfer_spec_decode_mean_acceptance_length", "Tokens emitted per verifying request-step "
             "(1 + accepted drafts per step)", spec["mean_acceptance_length"]),
        ):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model], float(value))
            yield g
        load = a.engine.expert_load()
        if load:
            c = CounterMetricFamily("fastinfer_moe_expert_tokens", "Tokens routed to each expert of each MoE "
                                    "layer (a token counts once per expert it chose): the routing balance",
                                    labels=["model_name", "layer", "expert"])
            for layer, counts in sorted(load.items()):
                for expert, n in enumerate(counts):
                    c.add_metric([self.model, str(layer), str(expert)], float(n))
            yield c
        g = GaugeMetricFamily("fastinfer_kv_cache_group_blocks_in_use", "KV blocks in use per KV cache group "
                              "(by sliding window; 'full': full attention)", labels=["model_name", "sliding_window"])
        for grp in s.kv_groups:
            g.add_metric([self.model, "full" if grp.sliding_window is None else str(grp.sliding_window)],
                         float(grp.num_in_use))
        yield g


class ServerMetrics:
    def __init__(self, get_engine: Callable[[], Any], model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        lab = ["model_name"]
        self.requests = Counter("fastinfer_requests", "Finished requests by finish reason",
                                lab + ["finish_reason"], registry=self.registry)
        self.prompt_tokens = Counter("fastinfer_prompt_tokens", "Prompt tokens processed", lab,
                                     registry=self.registry)
        self.generation_tokens = Counter("fastinfer_generation_tokens", "Tokens generated", lab,
                                         registry=self.registry)
        self.ttft = Histogram("fastinfer_time_to_first_token_seconds", "Time to first token", lab,
                              buckets=_LAT, registry=self.registry)
        self.tpot = Histogram("fastinfer_time_per_output_token_seconds", "Time per output token after the first",
                              lab, buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2), registry=self.registry)
        self.e2e = Histogram("fastinfer_e2e_request_latency_seconds", "Request latency", lab, buckets=_LAT,
                             registry=self.registry)
        self.registry.register(_EngineCollector(get_engine, model))

    def observe(self, out: RequestOutput) -> None:
        m = self.model
        for c in out.outputs:
            self.requests.labels(m, c.finish_reason or "unknown").inc()
        n_gen = sum(len(c.token_ids) for c in out.outputs)
        self.prompt_tokens.labels(m).inc(len(out.prompt_token_ids))
        self.generation_tokens.labels(m).inc(n_gen)
        ttft, e2e = out.metrics.get("ttft_s"), out.metrics.get("e2e_s")
        if ttft is not None:
            self.ttft.labels(m).observe(ttft)
        if e2e is not None:
            self.e2e.labels(m).observe(e2e)
            per_seq = max(len(c.token_ids) for c in out.outputs) if out.outputs else 0
            if ttft is not None and per_seq > 1:
                self.tpot.labels(m).observe((e2e - ttft) / (per_seq - 1))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
