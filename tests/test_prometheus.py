"""Against real components: a real Prometheus scrapes a real worker under load on loopback.

Every PromQL expression of the Grafana dashboard and of the alert rules goes through
Prometheus' HTTP API and must return data; the alert rules, on a time scale of seconds
(every "Nm" of deploy/prometheus/alerts.yml read as "Ns"), must fire in scenarios made to
fire them; /healthz and /readyz follow a real swergio server going away and coming back;
`loadgen` and `top` work as commands.

Needs Debian's `prometheus` package (`apt-get install prometheus`); without it these tests
skip on a developer's machine and fail under CI (CI=true), where .ci/run installs it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from processor.apps.loadgen import LoadGenerator
from tests import procs
from tests.procs import ROOT, cli, free_port, output, process, worker_env

pytestmark = pytest.mark.timeout(120)

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "swarm-aggregator.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
SCRAPE = "500ms"
RATE_INTERVAL = "3s"   # Grafana's $__rate_interval: at least 4 scrape intervals
RANGE = "30s"          # Grafana's $__range
JOB = "swarm-aggregator"
# Made by Prometheus, not exported by the worker.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        msg = (f"'{binary}' not found: install Debian's prometheus package "
               f"(apt-get install prometheus) to run the Prometheus tests")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


# -- helpers -------------------------------------------------------------------------------

def http(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 20.0,
             every: float = 0.2) -> Any:
    return procs.wait_for(probe, timeout, what, every)


class Prometheus:
    """A Prometheus server of our own: loopback, a free port, storage in a temp dir."""

    def __init__(self, base: str) -> None:
        self.base = base

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http(url)
        data = json.loads(body) if body.startswith("{") else {"status": "error",
                                                              "error": body}
        if data.get("status") != "success":
            raise AssertionError(f"{path} {params}: HTTP {status}: {data.get('error', body)}")
        return data["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" \
            else [{"metric": {}, "value": data["result"]}]
        return result

    def alerts(self, **labels: str) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"]
                if all(a["labels"].get(k) == v for k, v in labels.items())]

    def rules(self) -> list[dict[str, Any]]:
        return [dict(r, file=g["file"]) for g in self.api("rules")["groups"]
                for r in g["rules"]]


@contextmanager
def prometheus(tmp: Path, target: str, rule_files: list[Path]) -> Iterator[Prometheus]:
    binary = require("prometheus")
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {SCRAPE}\n"
        "  scrape_timeout: 400ms\n"
        f"  evaluation_interval: {SCRAPE}\n"
        "rule_files:\n" + "".join(f"  - {p}\n" for p in rule_files) +
        "scrape_configs:\n"
        f"  - job_name: {JOB}\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n")
    argv = [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
            "--storage.tsdb.retention.time=1h"]
    with process(argv) as proc:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for("prometheus to be ready", lambda: http(base + "/-/ready")[0] == 200
                     or proc.poll() is not None, timeout=30)
            assert proc.poll() is None, output(proc)
            yield Prometheus(base)
        except BaseException:
            print(output(proc), file=sys.stderr)
            raise


def seconds_scale(text: str) -> str:
    """alerts.yml on a time scale of seconds, its alerts labelled scale="seconds"."""
    text = re.sub(r"\[(\d+)m\]", r"[\1s]", text)
    text = re.sub(r"(?m)^(\s*for: )(\d+)m\s*$", r"\1\2s", text)
    text = re.sub(r"(?m)^(\s*)labels:\n", r"\1labels:\n\1  scale: seconds\n", text)
    assert "m]" not in text
    return text


def dashboard_queries() -> tuple[list[dict[str, Any]], list[str]]:
    """(panel targets, template variable queries) of the dashboard JSON."""
    board = json.loads(DASHBOARD.read_text())
    targets = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                targets.append(dict(t, panel=p["title"]))
            walk(p.get("panels", []))

    walk(board["panels"])
    variables = [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return targets, variables


def grafana_vars(expr: str) -> str:
    """What Grafana sends: its variables replaced (All = .*)."""
    for var, value in (("$__rate_interval", RATE_INTERVAL), ("$__range", RANGE),
                       ("${job}", ".*"), ("$job", ".*"), ("${instance}", ".*"),
                       ("$instance", ".*")):
        expr = expr.replace(var, value)
    assert "$" not in expr, expr
    return expr


PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                "group_left", "group_right", "inf", "nan", "Inf", "NaN"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, labels or keywords)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group() in PROMQL_WORDS:
            continue
        names.add(m.group())
    return names


def scrape_names(url: str) -> set[str]:
    status, text = http(url)
    assert status == 200
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def finite(result: list[dict[str, Any]]) -> list[float]:
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


# -- the live test -------------------------------------------------------------------------

def test_prometheus_runs_every_dashboard_and_alert_expression_against_a_live_worker(tmp_path):
    require("prometheus")
    sub, pub, mport = free_port(), free_port(), free_port()
    env = worker_env(transport__zmq__sub=f"tcp://127.0.0.1:{sub}",
                     transport__zmq__pub=f"tcp://127.0.0.1:{pub}",
                     window__models=5, window__key=["ENV_ID", "STEP"],
                     window__timeout_ms=400, window__min_models=3,
                     metrics__port=mport, metrics__max_models=3, log__level="ERROR")
    scaled = tmp_path / "alerts-seconds.yml"
    scaled.write_text(seconds_scale(ALERTS.read_text()))
    metrics_url = f"http://127.0.0.1:{mport}/metrics"
    with process(cli("run"), env) as worker, \
            prometheus(tmp_path, f"127.0.0.1:{mport}", [ALERTS, scaled]) as prom:
        # 5 models at 100 steps/s; 2% of model messages skipped (partial windows, which
        # also wait out the 400 ms deadline: the p99 latency alert), 25 faulty messages
        # a second (rejections), and an evolution GET every second.
        gen = LoadGenerator(f"tcp://127.0.0.1:{sub}", f"tcp://127.0.0.1:{pub}", models=5,
                            actions=6, rate=100, skip=0.02, bad_rate=25, get_every=1.0)
        assert gen.handshake(20), output(worker)
        runner = threading.Thread(target=gen.run, daemon=True)
        runner.start()
        try:
            # -- phase 1: load. Wait for enough scrapes that every rate has samples.
            wait_for("8 scrapes with actions", lambda: [
                r for r in prom.query("count_over_time(swarm_aggregator_actions_published_"
                                      "total[10s]) >= 8")])
            exported = scrape_names(metrics_url)
            check_dashboard(prom, exported)
            check_rules(prom, exported)
            for alert in ("SwarmAggregatorRejections", "SwarmAggregatorPartialWindows",
                          "SwarmAggregatorStepLatencyHigh"):
                wait_for(f"{alert} to fire", lambda a=alert: prom.alerts(
                    alertname=a, scale="seconds"), timeout=20)

            # -- phase 2: a model with a label of its own stops sending.
            shares = {r["metric"]["model"]: float(r["value"][1]) for r in prom.query(
                f"sum by (model) (rate(swarm_aggregator_contribution_total[{RATE_INTERVAL}]))")}
            assert "other" in shares and len(shares) == 4, shares  # 3 labels + other
            victim = min(m for m in shares if m != "other")
            gen.silent.add(victim)
            stopped = wait_for("SwarmAggregatorModelStopped", lambda: prom.alerts(
                alertname="SwarmAggregatorModelStopped", scale="seconds"), timeout=25)
            assert {a["labels"]["model"] for a in stopped} == {victim}

            # -- phase 3: the load stops: no actions.
            gen.stop.set()
            runner.join(10)
            quiet = wait_for("SwarmAggregatorNoActions", lambda: prom.alerts(
                alertname="SwarmAggregatorNoActions", scale="seconds"), timeout=25)
            assert quiet[0]["state"] in ("pending", "firing")
            assert quiet[0]["labels"]["job"] == JOB

            # -- phase 4: the worker stops: down.
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(10) == 0
            wait_for("SwarmAggregatorDown", lambda: prom.alerts(
                alertname="SwarmAggregatorDown", scale="seconds"), timeout=15)
            # and no rule of either file ever failed to evaluate
            assert all(r["health"] == "ok" for r in prom.rules()), prom.rules()
        finally:
            gen.stop.set()
            runner.join(10)
            gen.close()


def check_dashboard(prom: Prometheus, exported: set[str]) -> None:
    targets, variables = dashboard_queries()
    assert len(targets) >= 20
    used: set[str] = set()
    for t in targets:
        expr = grafana_vars(t["expr"])
        used |= metric_names(expr)
        result = prom.query(expr)
        values = finite(result)
        assert values, f"panel {t['panel']!r}: no data for {expr}: {result}"
        for label in re.findall(r"\{\{(\w+)\}\}", t.get("legendFormat", "")):
            assert all(label in r["metric"] for r in result), (t["panel"], label, result)
    # every metric name of the dashboard is one the worker exports (a live scrape)
    assert {"swarm_aggregator_contribution_total", "process_cpu_seconds_total"} <= used
    assert used <= exported, used - exported
    for v in variables:
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v)
        assert m, v
        selector, label = grafana_vars(m.group(1)), m.group(2)
        assert metric_names(selector) <= exported
        assert prom.api(f"label/{label}/values", **{"match[]": selector}), v
    # the numbers themselves: the load's rate, and shares that add up to 1
    rate = sum(finite(prom.query(grafana_vars(targets[0]["expr"]))))
    assert 50 <= rate <= 150, rate
    share_t = next(t for t in targets if t["panel"] == "Contribution share per model")
    assert sum(finite(prom.query(grafana_vars(share_t["expr"])))) == pytest.approx(1, abs=0.1)
    board_t = next(t for t in targets if t["panel"].startswith("Leaderboard"))
    assert sum(finite(prom.query(grafana_vars(board_t["expr"])))) == pytest.approx(1, abs=0.05)


def check_rules(prom: Prometheus, exported: set[str]) -> None:
    rules = wait_for("both rule files evaluated", lambda: [
        r for r in prom.rules()] if all(r["health"] == "ok" for r in prom.rules()) else [])
    real = [r for r in rules if r["file"] == str(ALERTS)]
    assert {r["name"] for r in real} == {
        "SwarmAggregatorDown", "SwarmAggregatorTransportDown", "SwarmAggregatorNoActions",
        "SwarmAggregatorStepLatencyHigh", "SwarmAggregatorPartialWindows",
        "SwarmAggregatorRejections", "SwarmAggregatorModelStopped"}
    assert len(rules) == 2 * len(real)
    for r in real:
        expr = r["query"]
        assert metric_names(expr) <= exported | PROMETHEUS_OWN, (r["name"], expr)
        prom.query(expr)  # evaluates (it may be empty: the alert does not fire)
        # the measured side of a "<measure> <op> <threshold>" alert has data now
        m = re.fullmatch(r"(.+?)\s*(==|!=|>=|<=|>|<)\s*[0-9.]+", expr, re.DOTALL)
        if m and r["name"] != "SwarmAggregatorModelStopped":
            assert finite(prom.query(m.group(1))), (r["name"], m.group(1))


# -- readiness with a real swergio server ---------------------------------------------------

SWERGIO_SERVER = ("import sys; from swergio import Server; "
                  "Server('127.0.0.1', int(sys.argv[1]), 'utf-8', 10, False).start()")


def gauge(url: str, name: str) -> float | None:
    status, text = http(url)
    if status != 200:
        return None
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            if s.name == name:
                return float(s.value)
    return None


def test_readyz_follows_the_swergio_server_healthz_does_not():
    port, mport = free_port(), free_port()
    env = worker_env(transport__kind="swergio", transport__swergio__port=port,
                     transport__swergio__reconnect_min_s=0.05,
                     transport__swergio__reconnect_max_s=0.3,
                     window__models=2, metrics__port=mport, log__level="ERROR")
    base = f"http://127.0.0.1:{mport}"
    server_argv = [sys.executable, "-c", SWERGIO_SERVER, str(port)]

    def status(path: str) -> int:
        return http(base + path, timeout=2)[0]

    def ready_gauge() -> float | None:
        return gauge(base + "/metrics", "swarm_aggregator_transport_ready")

    with process(cli("run"), env) as worker:
        wait_for("/healthz", lambda: status("/healthz") == 200, timeout=30)
        # no server yet: alive, not ready
        assert status("/readyz") == 503
        wait_for("the ready gauge at 0", lambda: ready_gauge() == 0.0)
        for round_ in range(2):
            with process(server_argv) as server:
                wait_for(f"/readyz 200 (round {round_})", lambda: status("/readyz") == 200)
                wait_for("the ready gauge at 1", lambda: ready_gauge() == 1.0)
                server.send_signal(signal.SIGKILL)  # the server dies, no goodbye
                server.wait(5)
            wait_for("/readyz 503 with the server gone", lambda: status("/readyz") == 503,
                     timeout=10)
            assert status("/healthz") == 200
            wait_for("the ready gauge at 0", lambda: ready_gauge() == 0.0)
        assert worker.poll() is None, output(worker)


# -- the commands: loadgen drives a worker process, top reads it ----------------------------

def test_loadgen_and_top_commands_against_a_worker_process():
    sub, pub, mport = free_port(), free_port(), free_port()
    env = worker_env(transport__zmq__sub=f"tcp://127.0.0.1:{sub}",
                     transport__zmq__pub=f"tcp://127.0.0.1:{pub}",
                     window__models=4, window__key=["ENV_ID", "STEP"],
                     window__timeout_ms=300, metrics__port=mport, log__level="ERROR")
    lg = cli("loadgen", "--pub", f"tcp://127.0.0.1:{sub}", "--sub", f"tcp://127.0.0.1:{pub}",
             "--models", "4", "--rate", "200", "--bad-rate", "5", "--duration", "4",
             "--wait", "20")
    with process(cli("run"), env), process(lg) as loadgen:
        import subprocess

        wait_for("actions", lambda: (gauge(f"http://127.0.0.1:{mport}/metrics",
                                           "swarm_aggregator_actions_published_total")
                                     or 0) > 50, timeout=30)
        r = subprocess.run(cli("top", f"127.0.0.1:{mport}", "--once", "--interval", "1"),
                           check=False, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert "transport ready" in r.stdout
        assert all(f"model-0{i}" in r.stdout for i in range(4)), r.stdout
        m = re.search(r"throughput\s+([\d.]+) actions/s", r.stdout)
        assert m and float(m.group(1)) > 50, r.stdout
        assert re.search(r"rejected/s\s+\w+ [\d.]+", r.stdout), r.stdout
        assert loadgen.wait(30) == 0
        out = output(loadgen)
    m = re.search(r"(\d+) steps sent, (\d+) actions back", out)
    assert m, out
    sent, back = int(m.group(1)), int(m.group(2))
    assert sent > 400 and back >= 0.95 * sent, out
