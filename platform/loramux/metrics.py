"""Prometheus metrics, named like vLLM's (``loramux:...``), one registry per app.

Engine gauges and counters are read from the engine's stats at scrape time; request
latencies are observed by the inference path as requests finish.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.responses import Response

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class EngineCollector(Collector):
    def __init__(self, engine_of: Any) -> None:
        self.engine_of = engine_of

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engine = self.engine_of()
        if engine is None:
            return
        stats = engine.stats()
        yield GaugeMetricFamily(
            "loramux:num_requests_running",
            "Requests in the engine's running batch.",
            stats.num_running,
        )
        yield GaugeMetricFamily(
            "loramux:num_requests_waiting", "Requests waiting for admission.", stats.num_waiting
        )
        yield GaugeMetricFamily(
            "loramux:kv_cache_usage_perc",
            "Fraction of the KV cache's blocks in use.",
            stats.kv_cache_usage,
        )
        yield GaugeMetricFamily(
            "loramux:kv_cache_blocks_used",
            "KV cache blocks held by requests.",
            stats.kv_blocks_used,
        )
        yield GaugeMetricFamily(
            "loramux:kv_cache_blocks_total",
            f"KV cache blocks ({stats.kv_block_size} tokens each).",
            stats.kv_blocks_total,
        )
        yield CounterMetricFamily(
            "loramux:prefix_cache_queries",
            "Prefix cache queries, in tokens.",
            stats.prefix_cache_queries_tokens_total,
        )
        yield CounterMetricFamily(
            "loramux:prefix_cache_hits",
            "Prefix cache hits, in tokens.",
            stats.prefix_cache_hits_tokens_total,
        )
        yield CounterMetricFamily(
            "loramux:num_preemptions",
            "Requests preempted (their KV blocks freed, recomputed later).",
            stats.num_preemptions_total,
        )
        yield CounterMetricFamily(
            "loramux:prompt_tokens", "Prompt tokens processed.", stats.num_prompt_tokens_total
        )
        yield CounterMetricFamily(
            "loramux:generation_tokens", "Tokens generated.", stats.num_generation_tokens_total
        )
        yield CounterMetricFamily(
            "loramux:engine_steps", "Engine steps run.", stats.num_steps_total
        )
        yield CounterMetricFamily(
            "loramux:spec_decode_num_draft_tokens",
            "Speculative draft tokens verified by the target model.",
            stats.spec_decode_num_draft_tokens_total,
        )
        yield CounterMetricFamily(
            "loramux:spec_decode_num_accepted_tokens",
            "Speculative draft tokens accepted (the target's own choice).",
            stats.spec_decode_num_accepted_tokens_total,
        )
        for name, value in sorted(stats.extra.items()):
            # Adapter-cache counters arrive as e.g. "adapter_cache_device_hits".
            safe = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
            yield GaugeMetricFamily(f"loramux:{safe}", f"Engine statistic {name}.", value)


class Metrics:
    def __init__(self, engine_of: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(EngineCollector(engine_of))
        self.time_to_first_token = Histogram(
            "loramux:time_to_first_token_seconds",
            "Time to the first token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e_request_latency = Histogram(
            "loramux:e2e_request_latency_seconds",
            "Request latency, admission to last token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "loramux:requests",
            "Finished inference requests by status.",
            ["status"],
            registry=self.registry,
        )

    def exposition(self) -> Response:
        """The registry in Prometheus' text format (``GET /metrics``, in ``api/health``)."""
        return Response(
            generate_latest(self.registry), media_type="text/plain; version=0.0.4; charset=utf-8"
        )
