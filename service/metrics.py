"""Prometheus metrics: one registry per app (tests build many apps in one process).

With ``b3mine serve --workers N`` each process exports its own counters; scrape each worker or
run one worker per container (the usual deployment) to aggregate in Prometheus.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _JobStates(Collector):
    """Job counts by state, read from the registry at scrape time (no drift across restarts)."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("b3mine_jobs", "jobs in the registry by state",
                                   labels=["state"])
        try:
            for state, n in self._counts().items():
                family.add_metric([state], n)
        except Exception:  # a scrape must not fail because the database is busy
            pass
        yield family


class Metrics:
    def __init__(self, job_counts: Callable[[], dict[str, int]],
                 cache_stats: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("b3mine_http_requests", "HTTP requests",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(
            "b3mine_http_request_duration_seconds", "time to the end of the response body",
            ["method", "route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.jobs_finished = Counter("b3mine_jobs_finished", "jobs that ended, by final state",
                                     ["state"], registry=self.registry)
        self.registry.register(_JobStates(job_counts))
        self.registry.register(_CacheStats(cache_stats))


class _CacheStats(Collector):
    def __init__(self, stats: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("b3mine_cache_lookups", "cache lookups since start",
                                   labels=["cache", "result"])
        for name, (hits, misses) in self._stats().items():
            family.add_metric([name, "hit"], hits)
            family.add_metric([name, "miss"], misses)
        yield family


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): it adds microseconds, not a task per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            # The route template, not the raw path: label cardinality stays bounded.
            name = getattr(route, "path", None) or "<unmatched>"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, name, str(status)).inc()
            self.metrics.latency.labels(method, name).observe(time.perf_counter() - start)
