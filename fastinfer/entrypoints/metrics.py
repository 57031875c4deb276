"""Prometheus metrics of one server (its own registry: no global state): our ``fastinfer_`` series and, beside
them, vLLM's ``vllm:`` series with vLLM's names and types (gauges, counters, histograms with its buckets), so
existing dashboards work. Every series carries ``model_name`` (the served name)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fastinfer.outputs import RequestOutput

_LAT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# vLLM's buckets
_VLLM_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
              40.0, 80.0, 160.0, 640.0, 2560.0)
_VLLM_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
             80.0)
_VLLM_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
             960.0, 1920.0, 7680.0)


def _buckets_1_2_5(limit: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (vLLM's token-count buckets)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(float(m * scale))
        scale *= 10


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
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", s.num_running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_usage),
        ):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model], float(value))
            yield g
        for name, doc, value in (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             s.prefix_queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", s.prefix_hits),
            ("vllm:num_preemptions", "Cumulative number of preemption from the engine.", s.num_preemptions),
        ):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([self.model], float(value))
            yield c
        g = GaugeMetricFamily("fastinfer_kv_cache_group_blocks_in_use", "KV blocks in use per KV cache group "
                              "(by sliding window; 'full': full attention)", labels=["model_name", "sliding_window"])
        for grp in s.kv_groups:
            g.add_metric([self.model, "full" if grp.sliding_window is None else str(grp.sliding_window)],
                         float(grp.num_in_use))
        yield g


class ServerMetrics:
    def __init__(self, get_engine: Callable[[], Any], model: str, max_model_len: int = 1 << 20) -> None:
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
        r = self.registry
        self.v_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                 lab + ["finished_reason"], registry=r)
        self.v_prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", lab, registry=r)
        self.v_gen = Counter("vllm:generation_tokens", "Number of generation tokens processed.", lab, registry=r)
        tokens = _buckets_1_2_5(max_model_len)
        self.v_req_prompt = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", lab,
                                      buckets=tokens, registry=r)
        self.v_req_gen = Histogram("vllm:request_generation_tokens", "Number of generation tokens processed.", lab,
                                   buckets=tokens, registry=r)
        self.v_ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                                lab, buckets=_VLLM_TTFT, registry=r)
        self.v_itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                               lab, buckets=_VLLM_ITL, registry=r)
        self.v_tpot = Histogram("vllm:time_per_output_token_seconds", "Histogram of time per output token in "
                                "seconds.", lab, buckets=_VLLM_ITL, registry=r)
        self.v_e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                               lab, buckets=_VLLM_E2E, registry=r)
        self.registry.register(_EngineCollector(get_engine, model))

    def observe(self, out: RequestOutput) -> None:
        """One finished request. The inter-token latency histogram gets one observation per gap between the
        longest sample's tokens (as vLLM's), each the request's mean gap: the engine reports first-token and end times
        only, so the count and sum are exact and the spread within a request is not."""
        m = self.model
        for c in out.outputs:
            self.requests.labels(m, c.finish_reason or "unknown").inc()
            self.v_success.labels(m, c.finish_reason or "unknown").inc()
        n_gen = sum(len(c.token_ids) for c in out.outputs)
        for prompt, gen in ((self.prompt_tokens, self.generation_tokens), (self.v_prompt, self.v_gen)):
            prompt.labels(m).inc(len(out.prompt_token_ids))
            gen.labels(m).inc(n_gen)
        self.v_req_prompt.labels(m).observe(len(out.prompt_token_ids))
        self.v_req_gen.labels(m).observe(n_gen)
        ttft, e2e = out.metrics.get("ttft_s"), out.metrics.get("e2e_s")
        if ttft is not None:
            self.ttft.labels(m).observe(ttft)
            self.v_ttft.labels(m).observe(ttft)
        if e2e is None:
            return
        self.e2e.labels(m).observe(e2e)
        self.v_e2e.labels(m).observe(e2e)
        per_seq = max(len(c.token_ids) for c in out.outputs) if out.outputs else 0
        if ttft is not None and per_seq > 1:
            gap = (e2e - ttft) / (per_seq - 1)
            self.tpot.labels(m).observe(gap)
            self.v_tpot.labels(m).observe(gap)
            itl = self.v_itl.labels(m)
            for _ in range(per_seq - 1):
                itl.observe(gap)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
