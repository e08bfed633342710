"""The benchmark suite as an instrument: `python -m bench --quick` runs every section and
writes JSON with sane figures. No timing is asserted: only that each figure exists, is a
positive finite number, and that nothing was lost."""

from __future__ import annotations

import json
import math
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.nats_helpers import server_binary

ROOT = Path(__file__).resolve().parents[1]
QUICK_TIMEOUT_S = 240
SECTIONS = ("zmq_lockstep", "zmq_pipelined", "swergio_lockstep", "metrics", "kernel", "cost",
            "nats")


def stats(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every {median, min, max, runs} figure in the result, with its path."""
    if isinstance(node, dict):
        if "median" in node:
            yield path, node
            return
        for k, v in node.items():
            yield from stats(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from stats(v, f"{path}[{i}]")


def positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.Popen([sys.executable, "-m", "bench", "--quick", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=QUICK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the suite stops the processes it started
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"bench --quick ran over {QUICK_TIMEOUT_S} s:\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    for name in SECTIONS:
        assert name in stdout  # the table names every section
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@pytest.mark.timeout(300)
def test_quick_suite_writes_every_section_with_sane_figures(quick: dict[str, Any]) -> None:
    sections = quick["sections"]
    assert set(sections) == set(SECTIONS)
    for name, section in sections.items():
        assert "error" not in section, f"{name}: {section.get('error')}"
    figures = list(stats(sections))
    assert len(figures) > 40
    for path, s in figures:
        assert s["runs"], path
        for key in ("median", "min", "max"):
            assert positive(s[key]), f"{path}.{key} = {s[key]!r}"
        assert all(positive(v) for v in s["runs"]), path
        assert s["min"] <= s["median"] <= s["max"], path
    assert quick["meta"]["quick"] is True


@pytest.mark.timeout(300)
def test_quick_suite_zmq_sections(quick: dict[str, Any]) -> None:
    lockstep = quick["sections"]["zmq_lockstep"]["rows"]
    assert lockstep
    for row in lockstep:
        for peer in ("worker", "pingpong"):
            s = row[peer]
            for key in ("steps_per_s", "p50_us", "p90_us", "p99_us"):
                assert key in s, (peer, key)
            assert s["p50_us"]["median"] <= s["p99_us"]["median"]
            assert s["lost"] == 0 and s["steps"] > 0
        assert positive(row["ratio_p50"]) and positive(row["ratio_steps_per_s"])
    for row in quick["sections"]["zmq_pipelined"]["rows"]:
        for peer in ("worker", "raw"):
            s = row[peer]
            assert positive(s["messages_per_s"]["median"])
            assert s["lost"] == 0 and s["duplicates"] == 0, (peer, s)
            assert s["steps"] > 0
        assert positive(row["ratio_messages_per_s"])


@pytest.mark.timeout(300)
def test_quick_suite_swergio_kernel_and_metrics(quick: dict[str, Any]) -> None:
    (row,) = quick["sections"]["swergio_lockstep"]["rows"]
    for agg in ("worker", "seed", "echo", "echo_plain"):
        assert positive(row[agg]["steps_per_s"]["median"]), agg
        assert row[agg]["steps"] > 0
    assert positive(row["ratio_worker_seed_steps_per_s"])
    assert positive(row["ratio_worker_echo_steps_per_s"])

    kernel = quick["sections"]["kernel"]
    assert kernel["aggregate"] and all("single_us_per_window" in r for r in kernel["aggregate"])
    assert any(k.startswith("batch_") for k in kernel["aggregate"][0])
    assert {d["actions"] for d in kernel["decode"]} == {18, 1000}

    metrics = quick["sections"]["metrics"]
    assert [r["mode"] for r in metrics["rows"]] == ["lockstep", "pipelined"]
    for r in metrics["rows"]:
        assert r["on"]["scrapes"] >= 1 and r["on"]["scrape_failures"] == 0
        assert positive(r["ratio_steps_per_s"])
    assert positive(metrics["instrumentation_us_per_window"]["median"])


def test_unknown_section_is_refused() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "zmq_lockstep,nope"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "nope" in proc.stderr


@pytest.mark.timeout(300)
def test_quick_suite_binary_frames_breakdown_cost_and_targets(quick: dict[str, Any]) -> None:
    pipelined = quick["sections"]["zmq_pipelined"]["rows"]
    assert {r["encoding"] for r in pipelined} == {"json", "binary"}
    for row in pipelined:
        assert row["worker"]["ratio_runs"] and all(positive(x)
                                                   for x in row["worker"]["ratio_runs"])
        if row["encoding"] == "binary":
            assert positive(row["worker"]["binary_over_json"])
    for row in quick["sections"]["zmq_lockstep"]["rows"]:
        assert row["transport"]["lost"] == 0 and row["transport"]["steps"] > 0
        assert all(positive(v) for k, v in row["breakdown"].items() if k.endswith("_us"))
        assert positive(row["send_span_us"])
        # The traced run: every window matched to the worker's own notes, each part
        # positive, and at most M messages read after the last publish.
        t = row["breakdown"]["traced"]
        assert t["windows"] == t["of"] > 0
        assert positive(t["in_us"]) and positive(t["worker_us"]) and positive(t["out_us"])
        assert 1 <= t["late"] <= quick["sections"]["zmq_lockstep"]["config"]["models"]
    cost = quick["sections"]["cost"]
    assert cost["rows"] and all(positive(r["worker"]["cpu_us_per_window"]["median"])
                                for r in cost["rows"])
    assert all(r["worker"]["instructions"] is None for r in cost["rows"])  # --quick: none
    names = [t["target"] for t in quick["targets"]]
    assert any(n.startswith("lockstep p50") for n in names)
    assert any(n.startswith("pipelined steps/s binary / JSON") for n in names)
    assert all(t["met"] in (True, False, None) for t in quick["targets"])


@pytest.mark.timeout(300)
def test_quick_suite_nats_section_and_its_targets(quick: dict[str, Any]) -> None:
    """NATS runs by default, short with --quick (one repeat, one worker, beside ZeroMQ), and
    its targets are printed with the others."""
    nats = quick["sections"]["nats"]
    (run,) = nats["runs"]  # --quick: one repeat
    assert [(r["case"], r["workers"]) for r in run] == [("zmq", 1), ("nats", 1)]
    for r in run:
        assert positive(r["steps_per_s"]) and positive(r["latency_p50_ms"]), r
        assert all(positive(v) for v in r["cpu_ms_per_step"].values()), r
    names = [t["target"] for t in quick["targets"]]
    assert "NATS steps/s, 1 worker / ZeroMQ's" in names
    assert "NATS worker CPU per step / ZeroMQ's" in names


# -- bench.nats_bench --replicas 3 and bench.scale ------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.skipif(server_binary() is None, reason="no nats-server binary")
def test_nats_bench_replicas_3_measures_a_three_node_cluster(tmp_path: Path) -> None:
    """`--replicas 3`: the NATS case runs on three clustered nats-servers, its streams at 3
    replicas (read back from the cluster), and the server CPU is the three nodes' sum, each
    node busy; the ZeroMQ case beside it is recorded as before (no R3 fields)."""
    out = tmp_path / "r3.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.nats_bench", "--models", "4", "--replicas", "3",
         "--workers", "1", "--partitions", "4", "--inflight", "16", "--seconds", "1.5",
         "--latency-steps", "30", "--json", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the bench stops the servers and workers it started
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"nats_bench --replicas 3 ran over 180 s:\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "replicas=3" in stdout
    zmq, nats = json.loads(out.read_text())
    assert zmq["case"] == "zmq" and "replicas" not in zmq
    assert "server_nodes_cpu_ms_per_step" not in zmq
    assert (nats["case"], nats["workers"], nats["replicas"]) == ("nats", 1, 3)
    assert positive(nats["steps_per_s"])
    nodes = nats["server_nodes_cpu_ms_per_step"]
    assert len(nodes) == 3 and all(positive(x) for x in nodes), nodes
    assert positive(nats["cpu_ms_per_step"]["server"])
    assert sum(nodes) == pytest.approx(nats["cpu_ms_per_step"]["server"], abs=0.005)


def test_nats_bench_r1_case_keeps_its_json_shape() -> None:
    """At R1 a case's JSON has exactly the keys bench.readme, bench.scale and `python -m
    bench` have always read: the R3 fields are left out."""
    from bench.nats_bench import Result, as_json

    r = Result("nats", 1, 1.0, 8.0, 1.0, 2.0, 3.0, 1.5, {"server": 0.2, "worker": 0.1})
    assert list(as_json(r)) == ["case", "workers", "steps_per_s", "msgs_per_s",
                                "latency_p50_ms", "latency_p90_ms", "latency_p99_ms",
                                "latency_mean_ms", "cpu_ms_per_step"]
    r.replicas, r.server_nodes_cpu_ms_per_step = 3, [0.1, 0.05, 0.05]
    assert as_json(r)["replicas"] == 3


def _nats_cases(server: list[float], worker: float, nodes: list[list[float]] | None = None
                ) -> list[dict[str, Any]]:
    """A bench.nats_bench --json result: a ZeroMQ and a one-worker NATS case per repeat."""
    out: list[dict[str, Any]] = []
    for i, s in enumerate(server):
        base = {"workers": 1, "steps_per_s": 1000.0, "repeat": i + 1}
        out.append({"case": "zmq", **base, "cpu_ms_per_step": {"worker": 0.1}})
        nats = {"case": "nats", **base, "cpu_ms_per_step": {"server": s, "worker": worker}}
        if nodes is not None:
            nats |= {"replicas": 3, "server_nodes_cpu_ms_per_step": nodes[i]}
        out.append(nats)
    return out


def test_scale_uses_the_measured_r3_server_cpu(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Given R3 results, the table's R3 server cores are the measured ones (the median over
    repeats), not 3 x R1 with `≈`; the busiest node gives an R3 ceiling. Without them, the
    estimate remains."""
    from bench import scale

    bench = {"sections": {
        "cost": {"rows": [{"actions": 18, "encoding": "json", "models": m,
                           "worker": {"cpu_us_per_window": {"median": us}}}
                          for m, us in ((8, 70.0), (20, 160.0))]},
        "zmq_lockstep": {"rows": [{"actions": 18, "encoding": "json", "message_bytes": 411}]}}}
    files = {"bench.json": bench,
             "m8.json": _nats_cases([0.2, 0.2, 0.2], 0.12),
             "m20.json": _nats_cases([0.5, 0.5, 0.5], 0.26),
             # R3: 5x R1 (so 3x would be wrong), repeats out of order (the median is 1.0)
             "m8-r3.json": _nats_cases([1.5, 1.0, 0.9], 0.13,
                                       [[0.5, 0.5, 0.5], [0.3, 0.4, 0.3], [0.3, 0.3, 0.3]]),
             "m20-r3.json": _nats_cases([2.5, 2.5, 2.5], 0.27, [[1.0, 0.75, 0.75]] * 3)}
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    nats = [f"{m}:{tmp_path / f}" for m, f in ((8, "m8.json"), (20, "m20.json"))]
    r3 = [f"{m}:{tmp_path / f}" for m, f in ((8, "m8-r3.json"), (20, "m20-r3.json"))]

    def table(*specs: str) -> tuple[dict[tuple[str, str], list[str]], str]:
        assert scale.main(["--bench", str(tmp_path / "bench.json"), "--nats", *specs]) == 0
        text = capsys.readouterr().out
        rows = [[c.strip() for c in line.strip("|").split("|")]
                for line in text.splitlines() if line.startswith("| 1")]
        return {(r[0], r[1]): r for r in rows}, text

    rows, text = table(*nats, *r3)
    assert rows[("10k", "8")][4] == "2.0 / 10"      # 10k steps/s x 1.0 ms (not ≈6.0)
    assert rows[("10k", "20")][4] == "5.0 / 25"
    assert rows[("10k", "8")][3] == "1.2"           # the worker on NATS: R1's figure
    assert "≈" not in text
    assert "R3 (the three nodes' sum) M = 8: 1,000 µs, M = 20: 2,500 µs" in text
    assert "of it the busiest node M = 8: 400 µs, M = 20: 1,000 µs" in text
    # 16 cores / 400 µs on the busiest node: 40k steps/s, a ceiling at 100k, not at 10k
    assert "the busiest node's 16 cores (≤ 40k steps/s at R3)" in rows[("100k", "8")][7]
    assert rows[("10k", "8")][7] == "fits"

    rows, text = table(*nats)                        # no R3 results: the estimate
    assert rows[("10k", "8")][4] == "2.0 / ≈6.0"
    assert "R3 not measured (≈ 3 × R1)" in text
    assert "at R3" not in text


def test_traced_parts_line_the_worker_notes_up_with_the_driver_stamps() -> None:
    """Two windows on one clock (ns): the driver's (first publish, last publish, action
    received), the worker's receives (r, start, end, messages) and actions (p, start, end).
    Notes outside the windows (a PEEK's reply, the previous window) must not count."""
    from bench.zmq_wire import traced_parts

    stamps = [(1_000, 21_000, 200_000), (300_000, 320_000, 500_000)]
    notes = [("r", 0, 900, 3), ("p", 500, 700, 0),                        # before both
             ("r", 30_000, 40_000, 2), ("r", 50_000, 90_000, 18),         # window 1
             ("p", 150_000, 160_000, 0),
             ("r", 310_000, 318_000, 5), ("r", 330_000, 370_000, 15),     # window 2
             ("p", 400_000, 410_000, 0)]
    t = traced_parts(stamps, notes)
    assert t["windows"] == t["of"] == 2
    # in: last read's end - last publish; worker: to the action's hand-over; out: from the
    # start of the hand-over to receipt (the three add up to the latency)
    assert t["in_us"] == statistics.median([(90_000 - 21_000) / 1e3, (370_000 - 320_000) / 1e3])
    assert t["worker_us"] == statistics.median([(150_000 - 90_000) / 1e3,
                                                (400_000 - 370_000) / 1e3])
    assert t["out_us"] == statistics.median([(200_000 - 150_000) / 1e3,
                                             (500_000 - 400_000) / 1e3])
    assert t["late"] == statistics.median([20, 15])  # reads ending after the last publish
    # A window whose action the notes lack is left out, not matched to the next one's.
    without = [n for n in notes if n[1] != 150_000]
    assert traced_parts(stamps, without)["windows"] == 1
