"""Metrics: names and label sets, the model label cap, buckets, hot-path cost, the HTTP server,
and the pure parts of `swarm-aggregator top`."""

from __future__ import annotations

import gzip
import io
import itertools
import math
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from processor import metrics as metrics_mod
from processor.apps import top
from processor.errors import REASONS
from processor.metrics import LATENCY_BUCKETS, Metrics, MetricsServer
from processor.window import OUTCOMES

pytestmark = pytest.mark.timeout(60)


def fresh(**kw) -> Metrics:
    return Metrics(CollectorRegistry(), **kw)


def test_names_follow_prometheus_conventions():
    m = fresh()
    m.credit(["a"], [1.0])
    m.receive("logits")
    families = list(m.registry.collect())
    assert families
    for f in families:
        assert f.name.startswith(("swarm_aggregator_", "process_")), f.name
        assert f.documentation, f.name
        assert f.name == f.name.lower() and " " not in f.name
        names = {s.name for s in f.samples}
        if f.type == "counter":
            assert all(n.endswith(("_total", "_created")) for n in names), (f.name, names)
        if f.type == "histogram":
            assert f.name.endswith("_seconds"), f.name
        if f.type == "gauge":
            assert not f.name.endswith("_total"), f.name
        if "latency" in f.name or "aggregation" in f.name or "time" in f.name:
            assert f.name.endswith("_seconds"), f.name  # base units


def test_closed_label_sets_are_exported_before_any_traffic():
    get = fresh().registry.get_sample_value
    for r in REASONS:
        assert get("swarm_aggregator_messages_rejected_total", {"reason": r}) == 0
    for o in OUTCOMES:
        assert get("swarm_aggregator_windows_closed_total", {"outcome": o}) == 0
    assert get("swarm_aggregator_evolution_requests_total", {"cmd": "GET"}) == 0
    assert get("swarm_aggregator_build_info", {"version": metrics_mod.__version__}) == 1


def test_model_labels_are_capped_and_the_overflow_is_counted_once_per_model():
    m = fresh(max_models=2)
    for _ in range(3):
        # as the worker calls it: credit, steps taken part in, agreements
        m.credit(["a", "b", "c", "d"], [0.4, 0.3, 0.2, 0.1], [1, 1, 1, 1], [1, 0, 0, 0])
    get = m.registry.get_sample_value
    assert get("swarm_aggregator_contribution_total", {"model": "a"}) == pytest.approx(1.2)
    assert get("swarm_aggregator_contribution_total", {"model": "b"}) == pytest.approx(0.9)
    assert get("swarm_aggregator_contribution_total", {"model": "other"}) == pytest.approx(0.9)
    assert get("swarm_aggregator_contribution_total", {"model": "c"}) is None
    assert get("swarm_aggregator_model_steps_total", {"model": "other"}) == 6
    assert get("swarm_aggregator_agreement_total", {"model": "a"}) == 3
    assert get("swarm_aggregator_model_label_overflow_total") == 2
    assert get("swarm_aggregator_model_label_limit") == 2


def test_every_model_goes_to_other_with_a_limit_of_zero():
    m = fresh(max_models=0)
    m.credit(["a", "b"], [0.5, 0.5], [1, 1], [1, 0])
    get = m.registry.get_sample_value
    assert get("swarm_aggregator_contribution_total", {"model": "other"}) == 1.0
    assert get("swarm_aggregator_model_label_overflow_total") == 2


def test_a_peer_inventing_model_ids_cannot_grow_memory(monkeypatch):
    """Past the label memory, credit with steps and agreements (the worker's call) goes on,
    and every model under "other" is counted once however often it comes back."""
    monkeypatch.setattr(metrics_mod, "OVERFLOW_MEMORY", 10)
    m = fresh(max_models=3)
    for i in range(1000):
        m.credit([f"m{i}", "regular"], [0.5, 0.5], [1, 1], [1, 0])
        m.missed([f"gone{i}", "regular"])
    assert len(m._labels) <= 3 and len(m._overflow) <= 10
    values = m.contribution.values
    assert set(values) == {"m0", "regular", "other"}
    assert sum(values.values()) == pytest.approx(1000)
    get = m.registry.get_sample_value
    assert get("swarm_aggregator_model_steps_total", {"model": "other"}) == 999
    assert get("swarm_aggregator_agreement_total", {"model": "other"}) == 999
    assert get("swarm_aggregator_missed_windows_total", {"model": "regular"}) == 1000
    # 999 invented ids and 999 "gone" ids past the three labels, each once
    assert get("swarm_aggregator_model_label_overflow_total") == 999 + 999


def test_a_model_under_other_in_every_window_is_counted_once(monkeypatch):
    monkeypatch.setattr(metrics_mod, "OVERFLOW_MEMORY", 10)
    m = fresh(max_models=1)
    for i in range(1000):
        m.credit(["first", f"m{i}", "regular"], [0.3, 0.3, 0.4], [1, 1, 1], [0, 0, 1])
    get = m.registry.get_sample_value
    assert get("swarm_aggregator_model_label_overflow_total") == 1000 + 1
    assert get("swarm_aggregator_agreement_total", {"model": "other"}) == 1000


def test_latency_buckets_resolve_tens_of_microseconds_to_seconds():
    assert LATENCY_BUCKETS[0] <= 2.5e-5 and LATENCY_BUCKETS[-1] >= 10
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    # no gap wider than 2.5x between neighbours: quantiles stay meaningful at every scale
    assert all(b / a <= 3.0 for a, b in itertools.pairwise(LATENCY_BUCKETS))
    m = fresh()
    m.published(30e-6, 20e-6, 1)
    m.published(2.0, 1.5, 1)
    get = m.registry.get_sample_value
    b = "swarm_aggregator_step_latency_seconds_bucket"
    assert get(b, {"since": "first", "le": "2.5e-05"}) == 0
    assert get(b, {"since": "first", "le": "5e-05"}) == 1
    assert get(b, {"since": "first", "le": "1.0"}) == 1
    assert get(b, {"since": "first", "le": "2.5"}) == 2
    assert get(b, {"since": "last", "le": "2.5e-05"}) == 1


def test_what_the_worker_records_for_a_window_adds_up():
    # (Its cost is measured in bench/, not asserted here.)
    m = fresh()
    models = [f"model-{i:02d}" for i in range(20)]
    credit = [0.05] * 20
    n = 500
    for _ in range(n):
        for _ in range(20):
            m.receive("logits")
        m.closed("complete")
        m.published(1e-3, 5e-4, 1)
        m.credit(models, credit, [1] * 20, [0] * 20)
    get = m.registry.get_sample_value
    assert get("swarm_aggregator_messages_received_total", {"topic": "logits"}) == n * 20
    assert get("swarm_aggregator_contribution_total",
               {"model": "model-00"}) == pytest.approx(n * 0.05)
    assert get("swarm_aggregator_model_steps_total", {"model": "model-19"}) == n


def test_scraping_while_the_loop_credits_new_models_is_safe():
    m = fresh(max_models=500)
    stop = threading.Event()
    errors: list[BaseException] = []

    def scrape() -> None:
        while not stop.is_set():
            try:
                generate_latest(m.registry)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return

    t = threading.Thread(target=scrape)
    t.start()
    try:
        for i in range(20000):
            m.credit([f"m{i % 700}"], [1.0], [1], [1])
            m.receive(f"topic{i % 3}")
    finally:
        stop.set()
        t.join()
    assert not errors


# -- the HTTP server ---------------------------------------------------------------------

@pytest.fixture
def server():
    m = fresh()
    state = {"ready": True}
    srv = MetricsServer(m, "127.0.0.1", 0, lambda: state["ready"]).start()
    yield srv, m, state
    srv.close()


def get(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_metrics_endpoint_serves_text_openmetrics_and_gzip(server):
    srv, m, _ = server
    m.credit(["a"], [1.0])
    base = f"http://127.0.0.1:{srv.port}"
    status, headers, body = get(base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b'swarm_aggregator_contribution_total{model="a"} 1.0' in body
    status, headers, body = get(base + "/metrics",
                                {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    status, headers, body = get(base + "/metrics", {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert b"swarm_aggregator_actions_published_total" in gzip.decompress(body)
    status, _, body = get(base + "/metrics?name[]=swarm_aggregator_open_windows")
    assert b"swarm_aggregator_open_windows" in body and b"contribution" not in body


def test_healthz_and_readyz(server):
    srv, _, state = server
    base = f"http://127.0.0.1:{srv.port}"
    assert get(base + "/healthz")[0] == 200
    assert get(base + "/readyz")[:1] == (200,)
    state["ready"] = False
    status, _, body = get(base + "/readyz")
    assert status == 503 and b"not ready" in body
    assert get(base + "/healthz")[0] == 200  # alive, though not ready
    state["ready"] = True
    assert get(base + "/readyz")[0] == 200
    assert get(base + "/nothing")[0] == 404


def test_readyz_answers_503_when_the_ready_callable_fails():
    def boom() -> bool:
        raise RuntimeError("transport gone")

    srv = MetricsServer(fresh(), "127.0.0.1", 0, boom).start()
    try:
        assert get(f"http://127.0.0.1:{srv.port}/readyz")[0] == 503
    finally:
        srv.close()


# -- swarm-aggregator top: the pure parts ------------------------------------------------

def test_quantile_matches_prometheus_histogram_quantile():
    # the same buckets as the p99 case of deploy/prometheus/alerts.test.yml: 0.496
    b = [(0.1, 0.0), (0.5, 100.0), (math.inf, 100.0)]
    assert top.quantile(0.99, b) == pytest.approx(0.496)
    assert top.quantile(0.5, b) == pytest.approx(0.3)
    assert math.isnan(top.quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]))
    assert top.quantile(0.99, [(0.1, 0.0), (math.inf, 5.0)]) == 0.1  # in +Inf: highest bound


def traffic(m: Metrics, windows: int, models: list[str]) -> None:
    for _ in range(windows):
        for _ in models:
            m.receive("logits")
        m.closed("complete")
        m.published(2e-3, 1e-3, 1)
        m.credit(models, [1 / len(models)] * len(models))


def test_compute_rates_quantiles_and_shares_between_two_scrapes():
    m = fresh(max_models=2)
    traffic(m, 10, ["a", "b", "c"])
    s0 = top.parse(generate_latest(m.registry).decode(), at=100.0)
    traffic(m, 40, ["a", "b"])
    m.reject("not_json")
    m.closed("partial")
    s1 = top.parse(generate_latest(m.registry).decode(), at=102.0)
    v = top.compute(s0, s1, "http://w/metrics")
    assert v.actions == pytest.approx(20.0) and v.steps == pytest.approx(20.0)
    assert v.received == {"logits": pytest.approx(40.0)}
    assert v.rejected["not_json"] == pytest.approx(0.5)
    assert v.windows["partial"] == pytest.approx(0.5)
    assert v.share == {"a": pytest.approx(0.5), "b": pytest.approx(0.5),
                       "other": pytest.approx(0.0)}
    assert sum(v.total.values()) == pytest.approx(50.0)
    p50, _, p99 = v.latency["first"]
    assert 1e-3 < p50 <= 2.5e-3 and 1e-3 < p99 <= 2.5e-3
    assert v.overflow == 1 and v.ready == 0.0
    screen = top.render(v)
    assert "20.0 actions/s" in screen and "not_json 0.5" in screen
    assert "other" in screen and "idle" in screen  # "other" (model c) has stopped
    lines = [ln for ln in screen.splitlines() if ln.strip()[:2] in ("1 ", "2 ", "3 ")]
    assert [ln.split()[1] for ln in lines][:2] in (["a", "b"], ["b", "a"])


def test_a_counter_reset_is_not_a_negative_rate():
    m1 = fresh()
    traffic(m1, 100, ["a"])
    m2 = fresh()  # the worker restarted
    traffic(m2, 4, ["a"])
    v = top.compute(top.parse(generate_latest(m1.registry).decode(), 0.0),
                    top.parse(generate_latest(m2.registry).decode(), 1.0))
    assert v.actions == pytest.approx(4.0)


def test_normalize_url():
    assert top.normalize_url("127.0.0.1:9464") == "http://127.0.0.1:9464/metrics"
    assert top.normalize_url("http://w:1/") == "http://w:1/"
    assert top.normalize_url("https://w:1/x/metrics") == "https://w:1/x/metrics"


def test_top_once_against_a_live_metrics_server():
    m = fresh()
    m.ready.set(1)
    srv = MetricsServer(m, "127.0.0.1", 0, lambda: True).start()
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            traffic(m, 5, ["alpha", "beta"])
            time.sleep(0.005)

    t = threading.Thread(target=load)
    t.start()
    out = io.StringIO()
    try:
        code = top.run_top(f"127.0.0.1:{srv.port}", interval=0.3, once=True, out=out)
    finally:
        stop.set()
        t.join()
        srv.close()
    assert code == 0
    text = out.getvalue()
    assert "transport ready" in text and "alpha" in text and "beta" in text
    assert "actions/s" in text


def test_top_once_reports_an_unreachable_worker(capsys):
    from tests.procs import free_port

    code = top.run_top(f"127.0.0.1:{free_port()}", interval=0.1, once=True,
                       out=io.StringIO())
    assert code == 1
    assert "cannot read" in capsys.readouterr().err
