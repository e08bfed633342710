"""`swarm-aggregator top`: a live, compact terminal view of a worker's /metrics.

For a user without Grafana: it scrapes the worker's Prometheus endpoint every interval and
shows throughput, step latency (p50/p90/p99, from the histogram buckets, as Prometheus'
`histogram_quantile` computes them), window outcomes, rejections and the contribution
leaderboard. Rates and quantiles are over the last `window` seconds of scrapes, so they
show what the worker does now, not averages since it started.

Pure pieces (`parse`, `compute`, `render`) are separate from the loop, so they are tested
without a terminal.
"""

from __future__ import annotations

import math
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

P = "swarm_aggregator_"
Labels = tuple[tuple[str, str], ...]


@dataclass
class Snapshot:
    at: float                                   # monotonic seconds when scraped
    samples: dict[str, dict[Labels, float]]     # sample name -> labels -> value

    def value(self, name: str, **labels: str) -> float | None:
        series = self.samples.get(name, {})
        want = tuple(sorted(labels.items()))
        for key, v in series.items():
            if all(item in key for item in want):
                return v
        return None

    def total(self, name: str, **labels: str) -> float:
        want = labels.items()
        return sum(v for key, v in self.samples.get(name, {}).items()
                   if all(item in key for item in want))

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        out: dict[str, float] = {}
        want = labels.items()
        for key, v in self.samples.get(name, {}).items():
            d = dict(key)
            if label in d and all(item in key for item in want):
                out[d[label]] = out.get(d[label], 0.0) + v
        return out


def parse(text: str, at: float) -> Snapshot:
    """A Snapshot of the Prometheus text exposition `text`."""
    samples: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return Snapshot(at, samples)


def _delta(cur: float, prev: float) -> float:
    return cur - prev if cur >= prev else cur  # a counter that went back: the worker restarted


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) pairs."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # in the +Inf bucket: the highest finite bound
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


@dataclass
class View:
    url: str
    seconds: float = 0.0
    version: str = ""
    ready: float | None = None
    actions: float = 0.0                  # per second
    steps: float = 0.0
    received: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, float] = field(default_factory=dict)
    windows: dict[str, float] = field(default_factory=dict)
    # since (first, last) -> p50, p90, p99
    latency: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    aggregation_p99: float = math.nan
    open_windows: float | None = None
    cpu: float | None = None              # fraction of one core
    rss: float | None = None              # bytes
    share: dict[str, float] = field(default_factory=dict)   # model -> share of recent steps
    total: dict[str, float] = field(default_factory=dict)   # model -> contribution since start
    overflow: float = 0.0
    label_limit: float | None = None


def _rates(cur: dict[str, float], prev: dict[str, float], dt: float) -> dict[str, float]:
    return {k: _delta(v, prev.get(k, 0.0)) / dt for k, v in cur.items()}


def _hist(cur: Snapshot, prev: Snapshot, name: str, **labels: str) -> list[tuple[float, float]]:
    now = cur.by(f"{name}_bucket", "le", **labels)
    before = prev.by(f"{name}_bucket", "le", **labels)
    return [(float(le), _delta(v, before.get(le, 0.0))) for le, v in now.items()]


def compute(prev: Snapshot, cur: Snapshot, url: str = "") -> View:
    """Rates, quantiles and shares between two snapshots."""
    dt = max(cur.at - prev.at, 1e-9)
    v = View(url=url, seconds=cur.at - prev.at)
    info = cur.by(f"{P}build_info", "version")
    v.version = next(iter(info), "")
    v.ready = cur.value(f"{P}transport_ready")
    v.open_windows = cur.value(f"{P}open_windows")
    v.label_limit = cur.value(f"{P}model_label_limit")
    v.overflow = cur.total(f"{P}model_label_overflow_total")
    v.actions = _delta(cur.total(f"{P}actions_published_total"),
                       prev.total(f"{P}actions_published_total")) / dt
    d_steps = _delta(cur.total(f"{P}environment_steps_total"),
                     prev.total(f"{P}environment_steps_total"))
    v.steps = d_steps / dt
    for attr, name, label in (("received", "messages_received_total", "topic"),
                              ("rejected", "messages_rejected_total", "reason"),
                              ("windows", "windows_closed_total", "outcome")):
        setattr(v, attr, _rates(cur.by(P + name, label), prev.by(P + name, label), dt))
    for since in ("first", "last"):
        b = _hist(cur, prev, f"{P}step_latency_seconds", since=since)
        v.latency[since] = (quantile(0.5, b), quantile(0.9, b), quantile(0.99, b))
    v.aggregation_p99 = quantile(0.99, _hist(cur, prev, f"{P}aggregation_seconds"))
    cpu_now = cur.value("process_cpu_seconds_total")
    cpu_before = prev.value("process_cpu_seconds_total")
    if cpu_now is not None and cpu_before is not None:
        v.cpu = _delta(cpu_now, cpu_before) / dt
    v.rss = cur.value("process_resident_memory_bytes")
    v.total = cur.by(f"{P}contribution_total", "model")
    before = prev.by(f"{P}contribution_total", "model")
    if d_steps > 0:
        v.share = {m: _delta(c, before.get(m, 0.0)) / d_steps for m, c in v.total.items()}
    return v


def _ms(x: float) -> str:
    if math.isnan(x):
        return "   -   "
    if x >= 1.0:
        return f"{x:6.2f} s"
    return f"{x * 1000:6.2f} ms" if x >= 1e-4 else f"{x * 1e6:5.0f} µs"


def _rate_list(rates: dict[str, float], limit: int = 6) -> str:
    shown = sorted(((k, r) for k, r in rates.items() if r > 0), key=lambda kv: -kv[1])
    if not shown:
        return "none"
    more = len(shown) - limit
    text = "  ".join(f"{k} {r:.1f}" for k, r in shown[:limit])
    return text + (f"  (+{more} more)" if more > 0 else "")


def render(v: View, top: int = 15, width: int = 100) -> str:
    """The screen: a header, four lines of figures, the leaderboard."""
    ready = {None: "?", 1.0: "ready"}.get(v.ready, "NOT READY")
    lines = [(f"swarm-aggregator top  {v.url}  {('v' + v.version) if v.version else ''}  "
              f"transport {ready}  (rates over {v.seconds:.1f} s)")]
    msgs = sum(v.received.values())
    lines.append(f"throughput  {v.actions:9.1f} actions/s  {v.steps:9.1f} steps/s  "
                 f"{msgs:9.1f} msgs/s  open windows "
                 f"{'-' if v.open_windows is None else f'{v.open_windows:.0f}'}")
    for since, text in (("first", "first msg"), ("last", "last msg")):
        p50, p90, p99 = v.latency.get(since, (math.nan,) * 3)
        lines.append(f"latency     from {text:<9} p50 {_ms(p50)}  p90 {_ms(p90)}  "
                     f"p99 {_ms(p99)}" + (f"   aggregation p99 {_ms(v.aggregation_p99)}"
                                          if since == "first" else ""))
    lines.append(f"windows/s   {_rate_list(v.windows)}")
    lines.append(f"rejected/s  {_rate_list(v.rejected)}")
    proc = []
    if v.cpu is not None:
        proc.append(f"cpu {v.cpu * 100:.0f}%")
    if v.rss is not None:
        proc.append(f"rss {v.rss / 1e6:.0f} MB")
    if proc:
        lines.append("process     " + "  ".join(proc))
    lines.append("")
    if not v.total:
        lines.append("contribution: no model has contributed yet")
        return "\n".join(lines)
    grand = sum(v.total.values()) or 1.0
    ranked = sorted(v.total, key=lambda m: (-v.share.get(m, 0.0), -v.total[m], m))
    name_w = min(24, max(5, *(len(m) for m in ranked[:top])))
    bar_w = max(10, width - name_w - 45)
    lines.append(f"{'#':>3}  {'model':<{name_w}}  {'now':>6}  {'':<{bar_w}}  {'total':>10} "
                 f"{'share':>6}")
    widest = max((v.share.get(m, 0.0) for m in ranked), default=0.0) or 1.0
    for i, m in enumerate(ranked[:top], 1):
        s = v.share.get(m)
        now = "     -" if s is None else f"{s:6.1%}"
        bar = "█" * round((s or 0.0) / widest * bar_w)  # the leader's bar is full width
        flag = "  idle" if s == 0.0 and v.steps > 0 else ""
        lines.append(f"{i:>3}  {m[:name_w]:<{name_w}}  {now}  {bar:<{bar_w}}  "
                     f"{v.total[m]:10.1f} {v.total[m] / grand:6.1%}{flag}")
    if len(ranked) > top:
        lines.append(f"     ... {len(ranked) - top} more models")
    if v.overflow:
        lines.append(f"     {v.overflow:.0f} models over the label limit "
                     f"({v.label_limit:.0f}) are summed under \"other\"")
    return "\n".join(lines)


def normalize_url(url: str) -> str:
    """`host:port` or a full URL; the path defaults to /metrics."""
    if "://" not in url:
        url = "http://" + url
    rest = url.split("://", 1)[1]
    if "/" not in rest:
        url += "/metrics"
    return url


def fetch(url: str, timeout: float = 3.0) -> str:
    req = urllib.request.Request(url, headers={"Accept": "text/plain;version=0.0.4"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body: bytes = r.read()
    return body.decode()


def run_top(url: str, interval: float = 1.0, window: float = 5.0, once: bool = False,
            top: int = 15, out: TextIO = sys.stdout,
            clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> int:
    """The `top` command: 0 when stopped with Ctrl-C (or after one view with `once`)."""
    url = normalize_url(url)
    history: deque[Snapshot] = deque()
    tty = out.isatty()
    error_shown = ""
    try:
        while True:
            try:
                snap = parse(fetch(url), clock())
            except (OSError, ValueError, urllib.error.URLError) as e:
                msg = f"swarm-aggregator top: cannot read {url}: {e}"
                if once:
                    print(msg, file=sys.stderr)
                    return 1
                if msg != error_shown:
                    print(msg, file=sys.stderr)
                    error_shown = msg
                history.clear()
                sleep(interval)
                continue
            error_shown = ""
            history.append(snap)
            while len(history) > 2 and snap.at - history[1].at >= window:
                history.popleft()
            if len(history) >= 2:
                screen = render(compute(history[0], snap, url), top)
                if tty:
                    out.write("\x1b[H\x1b[J" + screen + "\n")
                else:
                    out.write(screen + "\n\n")
                out.flush()
                if once:
                    return 0
            sleep(interval)
    except KeyboardInterrupt:
        return 0
