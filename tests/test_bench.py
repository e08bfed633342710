"""The benchmark suite as an instrument: `python -m bench --quick` runs every section and
writes JSON with sane figures. No timing is asserted: only that each figure exists, is a
positive finite number, and that nothing was lost."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
