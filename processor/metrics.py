"""Prometheus metrics (prefix `swarm_aggregator_`) and the small HTTP server that serves them.

One class owns every metric and takes its `CollectorRegistry`, so tests pass a fresh one.
Label sets are closed: rejection reasons come from `errors.REASONS`, window outcomes from
`window.OUTCOMES`, and model labels are capped at `metrics.max_models` (later models are
summed under `model="other"`, and each such model is counted once).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .errors import REASONS
from .window import OUTCOMES

PREFIX = "swarm_aggregator"
# From tens of microseconds (an action on loopback) to seconds (a window at its deadline).
LATENCY_BUCKETS = (2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                   5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
AGGREGATION_BUCKETS = (1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3,
                       1e-2, 0.05, 0.1)
COMMANDS = ("GET", "other")
OTHER = "other"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, max_models: int = 100) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.received = Counter(f"{PREFIX}_messages_received", "Messages received, by topic.",
                                ["topic"], registry=r)
        self.rejected = Counter(f"{PREFIX}_messages_rejected",
                                "Messages rejected, by reason.", ["reason"], registry=r)
        self.windows = Counter(f"{PREFIX}_windows_closed", "Windows closed, by outcome.",
                               ["outcome"], registry=r)
        self.actions = Counter(f"{PREFIX}_actions_published", "Action messages published.",
                               registry=r)
        self.decisions = Counter(f"{PREFIX}_environment_steps",
                                 "Environment steps decided (B per batched action).",
                                 registry=r)
        self.evolution = Counter(f"{PREFIX}_evolution_requests",
                                 "Evolution commands answered, by command.", ["cmd"],
                                 registry=r)
        self.contribution = Counter(f"{PREFIX}_contribution",
                                    "Credit of each model for the actions taken (sums to the "
                                    "environment steps decided).", ["model"], registry=r)
        self.model_overflow = Counter(f"{PREFIX}_model_label_overflow",
                                      "Models beyond metrics.max_models, counted under "
                                      "model=\"other\".", registry=r)
        self.latency = Histogram(f"{PREFIX}_step_latency_seconds",
                                 "From a window's first (since=first) or last (since=last) "
                                 "message to its action published.", ["since"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.aggregation = Histogram(f"{PREFIX}_aggregation_seconds",
                                     "Time to aggregate one burst of windows, per window.",
                                     buckets=AGGREGATION_BUCKETS, registry=r)
        self.open_windows = Gauge(f"{PREFIX}_open_windows", "Windows waiting for models.",
                                  registry=r)
        self.ready = Gauge(f"{PREFIX}_transport_ready",
                           "1 when the transport is connected and subscribed.", registry=r)
        self.max_models = max_models
        # Children bound once: label lookups stay off the hot path.
        self._rejected = {k: self.rejected.labels(k) for k in REASONS}
        self._windows = {k: self.windows.labels(k) for k in OUTCOMES}
        self._latency_first = self.latency.labels("first")
        self._latency_last = self.latency.labels("last")
        self._models: dict[str, Any] = {}
        self._topics: dict[str, Any] = {}
        for k in REASONS:
            self._rejected[k].inc(0)
        for k in OUTCOMES:
            self._windows[k].inc(0)
        for c in COMMANDS:
            self.evolution.labels(c).inc(0)

    def receive(self, topic: str, n: int = 1) -> None:
        child = self._topics.get(topic)
        if child is None:
            child = self._topics[topic] = self.received.labels(topic)
        child.inc(n)

    def reject(self, reason: str) -> None:
        self._rejected[reason].inc()

    def closed(self, outcome: str) -> None:
        self._windows[outcome].inc()

    def published(self, first_s: float, last_s: float, steps: int) -> None:
        self.actions.inc()
        self.decisions.inc(steps)
        self._latency_first.observe(first_s)
        self._latency_last.observe(last_s)

    def credit(self, models: Iterable[str], credits: Iterable[float]) -> None:
        for m, c in zip(models, credits):
            child = self._models.get(m)
            if child is None:
                child = self._model_child(m)
            child.inc(c)

    def _model_child(self, model: str) -> Any:
        if len(self._models) < self.max_models:
            child = self.contribution.labels(model)
        else:
            self.model_overflow.inc()
            child = self.contribution.labels(OTHER)
        self._models[model] = child
        return child


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class MetricsServer:
    """`/metrics`, `/healthz` (the process answers) and `/readyz` (the transport is up)."""

    def __init__(self, metrics: Metrics, host: str, port: int,
                 ready: Callable[[], bool]) -> None:
        self.metrics = metrics
        self.ready = ready
        self._httpd = make_server(host, port, self._app, server_class=_Server,
                                  handler_class=_QuietHandler)
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics",
                                        daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            body = generate_latest(self.metrics.registry)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            if self.ready():
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ready\n"]
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"not ready: transport down\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]
