"""Prometheus metrics (prefix `swarm_aggregator_`) and the small HTTP server that serves them.

One class owns every metric and takes its `CollectorRegistry`, so tests pass a fresh one.
Names follow Prometheus' rules: base units (`_seconds`), counters end in `_total`. Label sets
are closed: rejection reasons come from `errors.REASONS`, window outcomes from
`window.OUTCOMES`, and model labels are capped at `metrics.max_models` (later models are
summed under `model="other"`, and each such model is counted once in
`swarm_aggregator_model_label_overflow_total` while it is among the last 65,536 of them).

Cost on the hot path: the per-message and per-model counters (messages received, each
model's contribution) are plain float additions into a dict, turned into counter samples
only when /metrics is scraped; every other child is bound to its labels once, here.
"""

from __future__ import annotations

import itertools
import threading
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric

from . import __version__
from .errors import REASONS, ConfigError
from .messages import COMMANDS
from .window import OUTCOMES

PREFIX = "swarm_aggregator"
# From tens of microseconds (an action on loopback) to seconds (a window at its deadline).
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 7.5e-5, 1e-4, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 2.5e-3,
                   5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
AGGREGATION_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3,
                       5e-3, 1e-2, 0.05, 0.1)
OTHER = "other"
# Models under "other" remembered, most recent last (so each is counted once while it is
# remembered); past this many, the least recent is forgotten: memory stays bounded.
OVERFLOW_MEMORY = 65536


class SumsByLabel:
    """A counter family with one label whose values are plain floats until scraped.

    `values[label] += x` is all the hot path pays. The event loop is the only writer;
    the scrape thread reads a copy (`dict.copy` is atomic under the GIL).
    """

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.values: dict[str, float] = {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, total in sorted(self.values.copy().items()):
            family.add_metric([value], total)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=[self.label])


class LatencyHistogram:
    """A histogram family with one label, kept as plain lists until scraped.

    `observe(label, seconds)` is a bisection and two additions (prometheus_client's own
    histogram takes a lock and several calls per observation, on the path of every action).
    The event loop is the only writer; a scrape reads copies, so one scrape may see an
    observation in `_count` and not yet in `_sum`, never a bucket count that falls.
    """

    def __init__(self, name: str, documentation: str, label: str, values: Iterable[str],
                 buckets: Iterable[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = list(buckets)
        self.counts = {v: [0] * (len(self.bounds) + 1) for v in values}  # last: +Inf
        self.sums = {v: 0.0 for v in self.counts}

    def observe(self, value: str, seconds: float) -> None:
        self.counts[value][bisect_left(self.bounds, seconds)] += 1
        self.sums[value] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, counts in self.counts.items():
            counts = list(counts)
            total = self.sums[value]
            cumulative = list(itertools.accumulate(counts))
            buckets = [(repr(float(b)), c) for b, c in zip(self.bounds, cumulative)]
            buckets.append(("+Inf", cumulative[-1]))
            family.add_metric([value], buckets, total)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=[self.label])


class TransportEvents:
    """`swarm_aggregator_transport_events_total{event}`: the transport's own counters
    (reconnects, sends dropped while disconnected, NATS redeliveries and dead letters...),
    read from its `counters()` at scrape time."""

    name = f"{PREFIX}_transport_events"

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, int]] | None = None

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, "Events of the transport, by event.",
                                     labels=["event"])
        if self.source is not None:
            for event, n in sorted(self.source().items()):
                family.add_metric([event], n)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, "Events of the transport, by event.",
                                  labels=["event"])


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, max_models: int = 100,
                 process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.received = SumsByLabel(f"{PREFIX}_messages_received",
                                    "Messages read from the bus, by topic.", "topic")
        r.register(self.received)
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
        self.contribution = SumsByLabel(
            f"{PREFIX}_contribution",
            "Credit of each model for the environment steps decided (the credits of one "
            "step sum to 1): its rate over the rate of environment steps is the model's "
            "share.", "model")
        r.register(self.contribution)
        self.transport_events = TransportEvents()
        r.register(self.transport_events)
        self.model_steps = SumsByLabel(
            f"{PREFIX}_model_steps", "Environment steps decided with each model taking part.",
            "model")
        self.agreement = SumsByLabel(
            f"{PREFIX}_agreement",
            "Environment steps in which the model's own argmax was the action taken; over "
            "model_steps, the model's agreement.", "model")
        self.missed_windows = SumsByLabel(
            f"{PREFIX}_missed_windows", "Windows that closed without the model.", "model")
        for family in (self.model_steps, self.agreement, self.missed_windows):
            r.register(family)
        self.model_overflow = Counter(f"{PREFIX}_model_label_overflow",
                                      "Models beyond metrics.max_models, counted under "
                                      "model=\"other\".", registry=r)
        self.latency = LatencyHistogram(f"{PREFIX}_step_latency_seconds",
                                        "From a window's first (since=first) or last "
                                        "(since=last) message to its action published.",
                                        "since", ("first", "last"), LATENCY_BUCKETS)
        r.register(self.latency)
        self.aggregation = Histogram(f"{PREFIX}_aggregation_seconds",
                                     "Time to aggregate one burst of windows, per window.",
                                     buckets=AGGREGATION_BUCKETS, registry=r)
        self.open_windows = Gauge(f"{PREFIX}_open_windows", "Windows waiting for models.",
                                  registry=r)
        self.ready = Gauge(f"{PREFIX}_transport_ready",
                           "1 when the transport is connected and subscribed.", registry=r)
        self.max_models_gauge = Gauge(f"{PREFIX}_model_label_limit",
                                      "metrics.max_models: distinct model labels at most.",
                                      registry=r)
        self.info = Gauge(f"{PREFIX}_build_info", "Always 1; the version as a label.",
                          ["version"], registry=r)
        if process:
            # CPU seconds, resident memory, open fds: read from /proc at scrape time only.
            ProcessCollector(registry=r)
        self.info.labels(__version__).set(1)
        self.max_models = max_models
        self.max_models_gauge.set(max_models)
        # Children bound once: label lookups stay off the hot path.
        self._rejected = {k: self.rejected.labels(k) for k in REASONS}
        self._windows = {k: self.windows.labels(k) for k in OUTCOMES}
        self._first = self.latency.counts["first"]
        self._last = self.latency.counts["last"]
        self._labels: dict[str, str] = {}   # model id -> its own label (max_models at most)
        self._named = 0
        self._overflow: OrderedDict[str, None] = OrderedDict()  # under "other", recent last
        for k in REASONS:
            self._rejected[k].inc(0)
        for k in OUTCOMES:
            self._windows[k].inc(0)
        for c in COMMANDS:
            self.evolution.labels(c).inc(0)

    def receive(self, topic: str, n: int = 1) -> None:
        values = self.received.values
        values[topic] = values.get(topic, 0.0) + n

    def reject(self, reason: str, n: int = 1) -> None:
        self._rejected[reason].inc(n)

    def closed(self, outcome: str) -> None:
        self._windows[outcome].inc()

    def published(self, first_s: float, last_s: float, steps: int) -> None:
        self.published_many([first_s], [last_s], steps)

    def published_many(self, first_s: Sequence[float], last_s: Sequence[float],
                       steps: int) -> None:
        """Actions published: each one's latency since its window's first and last
        message, and `steps` environment steps decided by each."""
        n = len(first_s)
        self.actions.inc(n)
        self.decisions.inc(n * steps)
        bounds, h = self.latency.bounds, self.latency
        first, last = self._first, self._last
        for s in first_s:
            first[bisect_left(bounds, s)] += 1
        for s in last_s:
            last[bisect_left(bounds, s)] += 1
        h.sums["first"] += sum(first_s)
        h.sums["last"] += sum(last_s)

    def credit(self, models: Iterable[str], credits: Iterable[float],
               steps: Iterable[int] | None = None, agreed: Iterable[int] | None = None
               ) -> None:
        """Book models' credit (and, when given, steps taken part in and agreements)."""
        label_of = self._label_of
        labels = [label_of(m) for m in models]
        for family, counts in ((self.contribution, credits), (self.model_steps, steps),
                               (self.agreement, agreed)):
            if counts is not None:
                v = family.values
                for label, n in zip(labels, counts):
                    v[label] = v.get(label, 0.0) + n

    def missed(self, models: Iterable[str]) -> None:
        label_of = self._label_of
        v = self.missed_windows.values
        for m in models:
            label = label_of(m)
            v[label] = v.get(label, 0.0) + 1

    def _label_of(self, model: str) -> str:
        """The label of a model: its own while fewer than max_models have one, else other.

        Models under "other" are remembered in order of last use, at most OVERFLOW_MEMORY
        of them: a model in every window stays remembered (a dict lookup, counted once in
        model_label_overflow_total); ids a peer invents push out only each other.
        """
        label = self._labels.get(model)
        if label is not None:
            return label
        overflow = self._overflow
        if model in overflow:
            overflow.move_to_end(model)
            return OTHER
        if self._named < self.max_models:
            self._named += 1
            self._labels[model] = model
            return model
        self.model_overflow.inc()
        overflow[model] = None
        if len(overflow) > OVERFLOW_MEMORY:
            overflow.popitem(last=False)
        return OTHER


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """`/metrics`, `/healthz` (the process answers) and `/readyz` (the transport is up).

    /metrics is prometheus_client's own WSGI app: it negotiates OpenMetrics with
    Prometheus, compresses for clients that ask, and honours `?name[]=` filters.
    """

    def __init__(self, metrics: Metrics, host: str, port: int,
                 ready: Callable[[], bool]) -> None:
        self.metrics = metrics
        self.ready = ready
        self._metrics_app = make_wsgi_app(metrics.registry)
        try:
            self._httpd = make_server(host, port, self._app, server_class=_Server,
                                      handler_class=_QuietHandler)
        except OSError as e:
            raise ConfigError("metrics.port", f"cannot listen on {host}:{port}: "
                              f"{e.strerror or e} (another worker there? give each its "
                              "own metrics.port, or 0 for none)") from None
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
            body: list[bytes] = self._metrics_app(environ, start_response)
            return body
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok\n")
        if path == "/readyz":
            try:
                ok = bool(self.ready())
            except Exception:  # noqa: BLE001 - a probe answers, whatever the callable does
                ok = False
            if ok:
                return _text(start_response, "200 OK", "ready\n")
            return _text(start_response, "503 Service Unavailable",
                         "not ready: transport not connected\n")
        if path == "/":
            return _text(start_response, "200 OK",
                         "swarm-aggregator: /metrics /healthz /readyz\n")
        return _text(start_response, "404 Not Found",
                     "not found: try /metrics, /healthz or /readyz\n")


def _text(start_response: Callable[..., Any], status: str, text: str) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store")])
    return [body]
