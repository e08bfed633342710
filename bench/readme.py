"""The README's performance tables, rendered from a `python -m bench` JSON (nothing typed in):

    python -m bench.readme [bench/results/latest.json] [--nats 8:FILE 20:FILE]

Prints Markdown: the targets of issue 14 (with the earlier checkout's figures beside them
when the run had `--before`), where the lockstep microseconds go, the cost per window, and
the figures of every section beside their baselines. Each figure is the median of the
repeats with [min-max].
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import stat
from .report import num
from .report_wire import breakdown_parts


def _md(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _fig(s: dict[str, Any] | None, unit: str = "", digits: int | None = None) -> str:
    if not s:
        return "-"

    def one(x: float) -> str:
        return f"{x:.{digits}f}" if digits is not None else num(x)
    body = one(s["median"]) + unit
    if len(s.get("runs", [])) > 1:
        body += f" [{one(s['min'])}–{one(s['max'])}]"
    return body


def _ratio(runs: list[float] | None) -> str:
    """The median of per-repeat ratios [min-max], as the targets are given."""
    if not runs:
        return "-"
    return _fig(stat(runs), "x", 2)


def targets_table(result: dict[str, Any]) -> str:
    rows = []
    # the instruction and CPU counts have a table of their own (cost_table)
    entries = [t for t in result.get("targets", [])
               if not t["target"].lstrip().startswith(("instructions", "CPU per", "before: "))]
    for i, t in enumerate(entries):
        if t["target"].startswith("  "):
            continue  # a `before` line: shown in its target's row
        before = entries[i + 1] if (i + 1 < len(entries)
                                    and entries[i + 1]["target"].startswith("  ")) else None
        unit, digits = ("x", 2) if t["unit"] == "x" else (t["unit"], None)
        mark = "" if t["met"] is None or not t["goal"] else (" ✓" if t["met"] else " ✗")
        rows.append([t["target"], t["goal"].replace("<=", "≤").replace(">=", "≥") or "-",
                     _fig(before["figure"], unit, digits) if before else "-",
                     _fig(t["figure"], unit, digits) + mark,
                     f"{t['floor']:.2f}x" if t.get("floor") else "-"])
    return _md(["target", "goal", "before", "after", "floor"], rows)


def breakdown_table(result: dict[str, Any]) -> str:
    rows = []
    for row in result["sections"]["zmq_lockstep"]["rows"]:
        p = breakdown_parts(row)
        rows.append([f"{row['actions']}, {row['encoding']}", num(p["latency"]), num(p["wire"]),
                     num(p["receive"]), num(p["backlog"]), num(p["to_action"]),
                     f"{num(p['decode'])} / {num(p['aggregate'])}", num(p["rest"]),
                     num(p["books"])])
    return _md(["A, frames", "worker p50", "wire (ping-pong)", "receive path",
                "earlier messages left", "last message → action", "of it: decode / aggregate",
                "rest", "books, after the action"], rows)


def traced_table(result: dict[str, Any]) -> str:
    """The lockstep latency seen from inside the worker (a traced run), when measured."""
    rows = []
    for row in result["sections"]["zmq_lockstep"]["rows"]:
        t = row["breakdown"].get("traced")
        if t and t["windows"]:
            rows.append([f"{row['actions']}, {row['encoding']}", num(t["in_us"]),
                         num(t["worker_us"]), num(t["out_us"]), f"{t['late']:g}"])
    if not rows:
        return ""
    return _md(["A, frames", "last publish → last message read", "→ action sent",
                "→ action received", "messages read after the last publish"], rows)


def cost_table(result: dict[str, Any]) -> str:
    rows = []
    for row in result["sections"]["cost"]["rows"]:
        w, b = row["worker"], row.get("before")

        def ins(x: dict[str, Any] | None) -> str:
            i = x and x["instructions"]
            return f"{i['worker'] / 1e3:,.0f}k" if i else "-"
        change = "-"
        if b and w["instructions"] and b["instructions"]:
            change = f"{w['instructions']['worker'] / b['instructions']['worker']:.2f}x"
        rows.append([str(row["models"]), str(row["actions"]), row["encoding"], ins(b), ins(w),
                     change, _fig(b["cpu_us_per_window"]) if b else "-",
                     _fig(w["cpu_us_per_window"])])
    return _md(["M", "A", "frames", "instructions/window, before", "after", "after/before",
                "CPU µs/window, before", "after"], rows)


def figures_table(result: dict[str, Any]) -> str:
    s = result["sections"]
    rows = []
    for r in s.get("zmq_lockstep", {}).get("rows", []):
        w, p = r["worker"], r["pingpong"]
        rows.append([f"ZeroMQ lockstep, A = {r['actions']}, {r['encoding']}: latency last "
                     "model's publish → action, p50 / p99",
                     f"{_fig(w['p50_us'])} / {_fig(w['p99_us'])} µs",
                     f"ZeroMQ ping-pong: {_fig(p['p50_us'])} / {_fig(p['p99_us'])} µs",
                     _ratio(w.get("ratio_p50_runs")) + " p50"])
        if r["actions"] == 18 and r["encoding"] == "json":
            rows.append(["ZeroMQ lockstep, A = 18, json: steps/s", _fig(w["steps_per_s"]),
                         f"ping-pong round trips/s: {_fig(p['steps_per_s'])}",
                         f"{r['ratio_steps_per_s']:.2f}x"])
    for r in s.get("zmq_pipelined", {}).get("rows", []):
        w, raw = r["worker"], r["raw"]
        rows.append([f"ZeroMQ pipelined ({s['zmq_pipelined']['config']['inflight_windows']} "
                     f"windows in flight, keyed), A = {r['actions']}, {r['encoding']}: logits "
                     "messages/s, none lost",
                     f"{_fig(w['messages_per_s'])} ({_fig(w['steps_per_s'])} steps/s)",
                     f"bare receiver: {_fig(raw['messages_per_s'])}",
                     _ratio(w.get("ratio_runs"))])
    if "swergio_lockstep" in s and s["swergio_lockstep"].get("rows"):
        r = s["swergio_lockstep"]["rows"][0]
        rows.append([f"swergio lockstep, A = {r['actions']}: steps/s",
                     _fig(r["worker"]["steps_per_s"]),
                     f"the swergio example's aggregator: {_fig(r['seed']['steps_per_s'])}; a "
                     f"no-math echo on the same server: {_fig(r['echo']['steps_per_s'])}",
                     f"{r['ratio_worker_seed_steps_per_s']:.1f}x / "
                     f"{r['ratio_worker_echo_steps_per_s']:.2f}x"])
    k = s.get("kernel")
    if k:
        for r in k["aggregate"]:
            batches = [x for x in r if x.startswith("batch_")]
            rows.append([f"aggregation kernel, per window, A = {r['actions']}: 1 window per "
                         f"call / {' / '.join(x.split('_')[1] for x in batches)} per call",
                         " / ".join([_fig(r["single_us_per_window"])]
                                    + [_fig(r[x]) for x in batches]) + " µs", "", ""])
        for d in k["decode"]:
            rows.append([f"decoding per message, A = {d['actions']}: JSON / binary float32",
                         f"{_fig(d['decode_us'])} / {_fig(d['binary_decode_us'])} µs",
                         f"`orjson.loads` alone: {_fig(d['orjson_loads_us'])} µs", ""])
    m = s.get("metrics")
    if m:
        ratios = " / ".join(f"{r['ratio_steps_per_s']:.2f}x" for r in m["rows"])
        rows.append(["metrics server on and scraped, vs off (lockstep / pipelined steps/s)",
                     ratios, f"instrumentation: {_fig(m['instrumentation_us_per_window'])} µs "
                             "per window", ""])
    return _md(["what", "worker", "beside it, same run", "ratio"], rows)


def render(result: dict[str, Any]) -> str:
    meta = result.get("meta", {})
    host = meta.get("host", {})
    load = [f"{x[0]:.1f}" for x in (host.get("loadavg_start"), host.get("loadavg_end")) if x]
    before = meta.get("plan", {}).get("before")
    source = (f"a run of {meta.get('started', '?')}, {host.get('cpus', '?')} CPUs, load "
              f"{' -> '.join(load)}, commit {meta.get('git', {}).get('commit', '?')[:8]}"
              + (f", --before {before}" if before else ""))
    out = [f"<!-- generated by `python -m bench.readme` from {source} -->", "",
           targets_table(result)]
    if "zmq_lockstep" in result.get("sections", {}):
        out += ["", breakdown_table(result)]
        traced = traced_table(result)
        if traced:
            out += ["", traced]
    if "cost" in result.get("sections", {}):
        out += ["", cost_table(result)]
    out += ["", figures_table(result)]
    return "\n".join(out)


def nats_expect_table(cases: list[dict[str, Any]]) -> str:
    """The NATS section's "What to expect": each case of a `bench.nats_bench --json` run
    (one row per case and worker count), every figure as the min-max over its repeats."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for c in cases:
        groups.setdefault((c["case"], c["workers"]), []).append(c)

    def span(values: list[float], digits: int, unit: str = "") -> str:
        lo, hi = min(values), max(values)
        text = f"{lo:.{digits}f}" if round(lo, digits) == round(hi, digits) else \
            f"{lo:.{digits}f}–{hi:.{digits}f}"
        return text + unit

    rows = []
    for (case, workers), runs in groups.items():
        cpu = [r["cpu_ms_per_step"] for r in runs]
        name = ("ZeroMQ" if case == "zmq" else "NATS" if case == "nats" else case) + \
            f", {workers} worker{'s' if workers > 1 else ''}"
        worker = span([c["worker"] for c in cpu], 3, " ms") + (
            f" (all {workers})" if workers > 1 else "")
        server = span([c["server"] for c in cpu], 3, " ms") if "server" in cpu[0] else "-"
        rows.append([name, span([r["steps_per_s"] for r in runs], 0),
                     span([r["latency_p50_ms"] for r in runs], 2, " ms"),
                     span([r["latency_p99_ms"] for r in runs], 2, " ms"), worker, server,
                     span([c["driver"] for c in cpu], 3, " ms")])
    return _md(["case", "steps/s", "latency p50", "latency p99", "worker CPU per step",
                "server CPU per step", "load generator CPU per step"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from . import scale

    p = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="?", type=Path,
                   default=Path(__file__).resolve().parent / "results" / "latest.json")
    p.add_argument("--nats", nargs="*", default=[], metavar="M:FILE",
                   help="bench.nats_bench --json results: the scale table too (bench.scale)")
    p.add_argument("--nats-expect", type=Path, metavar="FILE",
                   help="a bench.nats_bench --json result (--repeats 3): only the NATS "
                        "section's \"What to expect\" table")
    args = p.parse_args(argv)
    if args.nats_expect is not None:
        print(nats_expect_table(json.loads(args.nats_expect.read_text())))
        return 0
    result = json.loads(args.json.read_text())
    print(render(result))
    if args.nats:
        costs = scale.costs_from(result, scale.load_nats(args.nats))
        print()
        print(scale.markdown(costs))
        print()
        print(scale.per_step(costs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
