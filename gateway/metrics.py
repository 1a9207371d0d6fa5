"""The gateway's own Prometheus metrics (one registry per gateway instance, so tests can run several).

``labels()`` on prometheus_client takes a lock and builds tuples; on the hot path we cache the labelled
children in plain dicts keyed by the label tuple.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the /metrics route)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.1)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self._requests = Counter("maestro_requests", "Requests handled, by route, model and HTTP status (499: the "
                                 "client left first; a stream cut after its 200: 502, 504 or 499, or 503 where "
                                 "the gateway's stop cut it)",
                                 ("route", "model", "status"), registry=r)
        self._latency = Histogram("maestro_request_duration_seconds",
                                  "End-to-end request time seen by the gateway", ("route",),
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self._overhead = Histogram("maestro_gateway_overhead_seconds",
                                   "Time the gateway itself added to a non-streamed request (from its body read to its "
                                   "answer, less the engine's answer and the queue wait)",
                                   ("route",), buckets=_OVERHEAD_BUCKETS, registry=r)
        self._ttfb = Histogram("maestro_time_to_first_byte_seconds",
                               "Streaming: time from request arrival to the first byte relayed to the client",
                               ("route",), buckets=_LATENCY_BUCKETS, registry=r)
        self._upstream_errors = Counter("maestro_upstream_errors", "Failed upstream attempts by engine and reason",
                                        ("engine", "reason"), registry=r)
        self._retries = Counter("maestro_retries", "Requests retried on another engine before the first byte",
                                registry=r)
        self._stalled = Counter("maestro_client_stalled", "Streams cut because a write to their client waited "
                                "timeouts.stream_idle_s (it stopped reading)", registry=r)
        self._tokens = Counter("maestro_tokens", "Tokens reported by engines' usage, by model and kind",
                               ("model", "kind"), registry=r)
        self.engines_up = Gauge("maestro_engines_up", "Engines currently marked up", registry=r)
        self.engines_sleeping = Gauge("maestro_engines_sleeping", "Engines up but asleep (or draining for a sleep): "
                                      "they take no request", registry=r)
        self._engine_up = Gauge("maestro_engine_up", "1 when the engine is up", ("engine",), registry=r)
        self.inflight = Gauge("maestro_inflight_requests", "Requests inside the gateway now", registry=r)
        self._queue_wait = Histogram("maestro_queue_wait_seconds", "Time a request waited in its pool queue "
                                     "before admission", ("pool",), buckets=_LATENCY_BUCKETS, registry=r)
        self._queued = Gauge("maestro_queued_requests", "Requests waiting in a pool queue now", ("pool",),
                             registry=r)
        self._kv_reserved = Gauge("maestro_kv_reserved_tokens", "KV tokens reserved on an engine (shared ledger)",
                                  ("engine",), registry=r)
        self._kv_capacity = Gauge("maestro_kv_capacity_tokens", "KV capacity of an engine in tokens", ("engine",),
                                  registry=r)
        self.ledger_degraded = Gauge("maestro_ledger_degraded", "1 while the shared ledger is unreachable and "
                                     "a local share of each engine is used", registry=r)
        self._cluster_choice = Counter("maestro_cluster_choices", "Pool chosen for requests by cluster routing",
                                       ("cluster", "pool"), registry=r)
        self._children: dict[tuple, object] = {}

    def _child(self, metric, *labels: str):
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request_done(self, route: str, model: str, status: int, duration_s: float, overhead_s: float) -> None:
        self._child(self._requests, route, model, str(status)).inc()
        self._child(self._latency, route).observe(duration_s)
        if overhead_s >= 0:
            self._child(self._overhead, route).observe(overhead_s)

    def unknown_route(self) -> None:
        """A request for no route of ours: counted as route "unknown", model "-", status 404."""
        self._child(self._requests, "unknown", "-", "404").inc()

    def first_byte(self, route: str, seconds: float) -> None:
        self._child(self._ttfb, route).observe(seconds)

    def upstream_error(self, engine_id: str, reason: str) -> None:
        self._child(self._upstream_errors, engine_id, reason).inc()

    def retried(self) -> None:
        self._retries.inc()

    def client_stalled(self) -> None:
        self._stalled.inc()

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        if prompt:
            self._child(self._tokens, model, "prompt").inc(prompt)
        if completion:
            self._child(self._tokens, model, "completion").inc(completion)

    def engine_up(self, engine_id: str, up: bool) -> None:
        self._child(self._engine_up, engine_id).set(1 if up else 0)

    def queue_wait(self, pool: str, seconds: float) -> None:
        self._child(self._queue_wait, pool).observe(seconds)

    def queued(self, pool: str, count: int) -> None:
        self._child(self._queued, pool).set(count)

    def kv(self, engine_id: str, reserved: int, capacity: int) -> None:
        self._child(self._kv_reserved, engine_id).set(reserved)
        self._child(self._kv_capacity, engine_id).set(capacity)

    def cluster_choice(self, cluster: str, pool: str) -> None:
        self._child(self._cluster_choice, cluster, pool).inc()

    def watch_online_learning(self, status: Callable[[], dict[str, Any] | None]) -> None:
        """Export online learning's counters, read from ``status()`` (the learner's own) at each scrape."""
        self.registry.register(_OnlineLearningCollector(status))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _OnlineLearningCollector:
    """Reads the learner's counters when scraped, so the request path never touches a metric for them."""

    def __init__(self, status: Callable[[], dict[str, Any] | None]) -> None:
        self.status = status

    def collect(self):
        status = self.status()
        if status is None:
            return
        records = CounterMetricFamily("maestro_predictor_records", "Completed chat requests offered to online "
                                      "learning, by outcome (buffered, unusable, dropped, failed)",
                                      labels=("outcome",))
        for outcome, count in status["records"].items():
            records.add_metric((outcome,), count)
        yield records
        refits = CounterMetricFamily("maestro_predictor_refits", "Online refits of the predictor, by outcome",
                                     labels=("outcome",))
        refits.add_metric(("ok",), status["refits"])
        refits.add_metric(("failed",), status["refit_failures"])
        refits.add_metric(("rejected",), status["refit_rejections"])
        yield refits
        yield GaugeMetricFamily("maestro_predictor_refit_running", "1 while an online refit runs",
                                value=1 if status["refitting"] else 0)
