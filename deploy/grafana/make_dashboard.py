"""Writes dashboards/swarm-aggregator.json, the Grafana dashboard of a swarm-aggregator worker.

    python deploy/grafana/make_dashboard.py          # rewrite the JSON
    python deploy/grafana/make_dashboard.py --check  # exit 1 if the JSON is not up to date

The JSON is committed (Grafana provisions it as is); this script is its source, so panels
stay consistent: one label selector, one rate interval, one datasource variable. Every
PromQL expression here is run against a live Prometheus scraping a worker by
tests/test_prometheus.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "swarm-aggregator.json"
UID = "swarm-aggregator"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'
RI = "$__rate_interval"
P = "swarm_aggregator_"


def q(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "refId": ref,
                         "legendFormat": legend or "__auto", "range": not instant,
                         "instant": instant}
    return t


def quantiles(metric: str, extra: str = "", by: str = "") -> list[dict[str, Any]]:
    group = f"{by}, le" if by else "le"
    sel = SEL + (f", {extra}" if extra else "")
    out = []
    for i, (qq, name) in enumerate(((0.5, "p50"), (0.9, "p90"), (0.99, "p99"))):
        legend = f"{name} since {{{{{by}}}}}" if by else name
        out.append(q(f"histogram_quantile({qq}, sum by ({group}) "
                     f"(rate({metric}_bucket{{{sel}}}[{RI}])))", legend, "ABC"[i]))
    return out


class Board:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0

    def row(self, title: str) -> None:
        self.panels.append({"type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                            "id": len(self.panels) + 1, "panels": []})
        self.y += 1

    def add(self, panels: list[tuple[int, int, dict[str, Any]]]) -> None:
        """A band of panels: (width, height, panel) from left to right."""
        x, h_max = 0, 0
        for w, h, p in panels:
            p["id"] = len(self.panels) + 1
            p["gridPos"] = {"h": h, "w": w, "x": x, "y": self.y}
            p.setdefault("datasource", DS)
            self.panels.append(p)
            x += w
            h_max = max(h_max, h)
        assert x <= 24, "a band is at most 24 wide"
        self.y += h_max


def stat(title: str, targets: list[dict[str, Any]], unit: str, description: str,
         mappings: list[dict[str, Any]] | None = None,
         thresholds: list[dict[str, Any]] | None = None, decimals: int | None = None
         ) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "mappings": mappings or [],
                                "color": {"mode": "thresholds"},
                                "thresholds": {"mode": "absolute", "steps": thresholds or [
                                    {"color": "green", "value": None}]}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {"type": "stat", "title": title, "description": description, "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                          "values": False},
                        "colorMode": "value", "graphMode": "area", "justifyMode": "auto",
                        "orientation": "auto", "textMode": "auto"}}


def series(title: str, targets: list[dict[str, Any]], unit: str, description: str,
           stack: str = "none", fill: int = 10, log: bool = False, maximum: float | None = None
           ) -> dict[str, Any]:
    custom: dict[str, Any] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": fill,
                              "showPoints": "never", "spanNulls": False,
                              "stacking": {"mode": stack, "group": "A"},
                              "axisSoftMin": 0}
    if log:
        custom["scaleDistribution"] = {"type": "log", "log": 10}
        del custom["axisSoftMin"]
    defaults: dict[str, Any] = {"unit": unit, "custom": custom, "min": None if log else 0}
    if maximum is not None:
        defaults["max"] = maximum
    return {"type": "timeseries", "title": title, "description": description,
            "targets": targets, "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "right",
                                   "calcs": ["lastNotNull", "max"], "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def build() -> dict[str, Any]:
    b = Board()
    rate = lambda name, extra="": f"rate({P}{name}{{{SEL}{', ' + extra if extra else ''}}}[{RI}])"
    first_bucket = rate("step_latency_seconds_bucket", 'since="first"')
    b.add([
        (4, 4, stat("Actions / s", [q(f"sum({rate('actions_published_total')})")], "ops",
                    "Action messages published per second (one per window).")),
        (4, 4, stat("Environment steps / s", [q(f"sum({rate('environment_steps_total')})")],
                    "ops", "Environment steps decided per second (B per batched action).")),
        (4, 4, stat("p99 step latency", [q(
            f"histogram_quantile(0.99, sum by (le) ({first_bucket}))")], "s",
            "From a window's first message to its action published, 99th percentile.",
            thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.1},
                        {"color": "red", "value": 1}])),
        (4, 4, stat("Open windows", [q(f"sum({P}open_windows{{{SEL}}})")], "short",
                    "Windows waiting for models now.", decimals=0)),
        (4, 4, stat("Transport", [q(f"min({P}transport_ready{{{SEL}}})")], "short",
                    "Whether every selected worker's transport is connected and "
                    "subscribed (its /readyz).",
                    mappings=[{"type": "value", "options": {
                        "0": {"text": "DOWN", "color": "red"},
                        "1": {"text": "ready", "color": "green"}}}],
                    thresholds=[{"color": "red", "value": None},
                                {"color": "green", "value": 1}])),
        (4, 4, stat("Models contributing", [q(
            f"count(sum by (model) ({rate('contribution_total')}) > 0)")], "short",
            "Model labels with a share of the recent actions (models beyond "
            "metrics.max_models count once, as \"other\").", decimals=0)),
    ])
    b.row("Throughput and latency")
    b.add([
        (12, 8, series("Throughput", [
            q(f"sum({rate('actions_published_total')})", "actions/s", "A"),
            q(f"sum({rate('environment_steps_total')})", "environment steps/s", "B"),
            q(f"sum by (topic) ({rate('messages_received_total')})",
              "messages/s {{topic}}", "C"),
        ], "ops", "Actions published, environment steps decided, and messages read per "
                  "topic, per second.")),
        (12, 8, series("Step latency", quantiles(f"{P}step_latency_seconds", by="since"),
                       "s", "From a window's first (since first) or last (since last) message "
                            "to its action published: p50, p90 and p99. A window closed at "
                            "its deadline shows here as window.timeout_ms.", fill=0,
                       log=True)),
    ])
    b.add([
        (12, 8, series("Window outcomes", [
            q(f"sum by (outcome) ({rate('windows_closed_total')})", "{{outcome}}")],
            "ops", "Windows closed per second: complete (every model), partial (deadline, "
                   "published), dropped (deadline, below min_models), evicted "
                   "(window.max_open).", stack="normal")),
        (12, 8, series("Rejected messages by reason", [
            q(f"sum by (reason) ({rate('messages_rejected_total')})", "{{reason}}")],
            "ops", "Messages rejected per second, by reason (never fatal; the log names the "
                   "senders).", stack="normal")),
    ])
    b.row("Contribution")
    b.add([
        (16, 10, series("Contribution share per model", [q(
            f"sum by (model) ({rate('contribution_total')}) / scalar(sum("
            f"{rate('environment_steps_total')}))", "{{model}}")],
            "percentunit", "Each model's share of the actions taken (p_m[a] / P[a], summed "
                           "over the steps decided), over time. The shares of one moment "
                           "add up to 100%.", stack="normal", fill=60, maximum=1)),
        (8, 10, {"type": "bargauge", "title": "Leaderboard (dashboard time range)",
                 "description": "Each model's share of the actions over the selected time "
                                "range, best first.",
                 "targets": [q(f"sort_desc(sum by (model) (increase({P}contribution_total"
                               f"{{{SEL}}}[$__range])) / scalar(sum(increase("
                               f"{P}environment_steps_total{{{SEL}}}[$__range]))))",
                               "{{model}}", instant=True)],
                 "fieldConfig": {"defaults": {"unit": "percentunit", "min": 0,
                                              "color": {"mode": "continuous-GrYlRd"}},
                                 "overrides": []},
                 "options": {"orientation": "horizontal", "displayMode": "gradient",
                             "showUnfilled": True, "valueMode": "color",
                             "reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                               "values": False}}}),
    ])
    b.row("Worker")
    b.add([
        (6, 8, series("Open windows", [q(f"sum by (instance) ({P}open_windows{{{SEL}}})",
                                         "{{instance}}")],
                      "short", "Windows waiting for models (capped by window.max_open).")),
        (6, 8, series("Aggregation time per window", quantiles(f"{P}aggregation_seconds"),
                      "s", "Time to aggregate one window (bursts are aggregated together; "
                           "this is per window).", fill=0)),
        (6, 8, series("Evolution requests", [
            q(f"sum by (cmd) ({rate('evolution_requests_total')})", "{{cmd}}")],
            "ops", "Evolution commands answered per second (GET resets the ledger).")),
        (6, 8, series("Transport ready, label overflow", [
            q(f"min by (instance) ({P}transport_ready{{{SEL}}})", "ready {{instance}}", "A"),
            q(f"sum({P}model_label_overflow_total{{{SEL}}})", "models under \"other\"", "B"),
        ], "short", "1 while the transport is connected; the number of models beyond "
                    "metrics.max_models, summed under model=\"other\".", fill=0)),
    ])
    b.add([
        (12, 7, series("CPU", [q(f"sum by (instance) (rate(process_cpu_seconds_total{{{SEL}}}"
                                 f"[{RI}]))", "{{instance}}")],
                       "percentunit", "CPU time per second of each worker process (1 = one "
                                      "core).", fill=0)),
        (12, 7, series("Memory", [q(f"sum by (instance) (process_resident_memory_bytes"
                                    f"{{{SEL}}})", "{{instance}}")],
                       "bytes", "Resident memory of each worker process.", fill=0)),
    ])

    def var(name: str, label: str, query: str) -> dict[str, Any]:
        return {"name": name, "label": label, "type": "query", "datasource": DS,
                "query": query, "definition": query,
                "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "sort": 1, "hide": 0, "options": []}

    return {
        "uid": UID,
        "title": "swarm-aggregator",
        "description": "Throughput, latency, windows, rejections and each model's "
                       "contribution, from a swarm-aggregator worker's /metrics.",
        "tags": ["swarm-aggregator", "reinforcement-learning"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "5s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-15m", "to": "now"},
        "timepicker": {"refresh_intervals": ["5s", "10s", "30s", "1m", "5m"]},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "hide": 0, "refresh": 1, "regex": "",
             "current": {}, "options": []},
            var("job", "Job", f"label_values({P}build_info, job)"),
            var("instance", "Instance", f'label_values({P}build_info{{job=~"$job"}}, instance)'),
        ]},
        "panels": b.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUT.read_text() != text:
            print(f"{OUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
