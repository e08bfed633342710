"""The printed table: one block per section, figures as `median [min-max]` over repeats."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def num(x: float) -> str:
    """Three significant figures, thousands separated."""
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fig(s: dict[str, Any] | None) -> str:
    if s is None:
        return "-"
    if len(s["runs"]) == 1:
        return num(s["median"])
    return f"{num(s['median'])} [{num(s['min'])}-{num(s['max'])}]"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = indent + "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, indent + "  ".join("-" * w for w in widths)]
    out += [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return out


def cpu(s: dict[str, Any], name: str = "peer") -> str:
    x = s.get("cpu", {}).get(name)
    return "-" if x is None else f"{x:.2f}"


LATENCY_HEADER = ["p50 µs", "p90 µs", "p99 µs", "max µs"]


def latency(s: dict[str, Any]) -> list[str]:
    return [fig(s.get("p50_us")), fig(s.get("p90_us")), fig(s.get("p99_us")),
            fig(s.get("max_us"))]


def swergio_lockstep(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    rows = []
    row = r["rows"][0]
    for name in ("worker", "seed", "echo", "echo_plain"):
        s = row[name]
        rows.append([str(row["actions"]), name, fig(s["steps_per_s"]), *latency(s),
                     cpu(s), cpu(s, "server")])
    return [(f"swergio_lockstep: M={c['models']}, A={c['actions']}, {c['server']}; driver: "
             f"{c['driver']}"),
            *table(["A", "aggregator", "steps/s", *LATENCY_HEADER, "agg CPU", "server CPU"],
                   rows),
            (f"  worker/seed {row['ratio_worker_seed_steps_per_s']:.1f}x steps/s, "
             f"worker/echo {row['ratio_worker_echo_steps_per_s']:.2f}x steps/s "
             "(echo: no math, TCP_QUICKACK: the server's ceiling; echo_plain: without "
             "QUICKACK, the delayed-ACK stall)")]


def swergio_server(r: dict[str, Any]) -> list[str]:
    c, rt, p = r["config"], r["round_trip"], r["pipeline"]
    rows = [[name, fig(rt[name]["p50_us"]), fig(rt[name]["p99_us"]),
             fig(rt[name]["steps_per_s"]), cpu(rt[name], "server")]
            for name in ("original", "ours")]
    out = [f"swergio_server: round trips of two unchanged swergio 0.0.2 clients "
           f"({c['round_trip']})",
           *table(["server", "p50 µs", "p99 µs", "round trips/s", "server CPU"], rows),
           f"  original/ours {rt['ratio_original_ours_p50']:.0f}x p50", ""]
    for kind, q in p.items():
        rows = [[k, c["setups"][k], str(q["steps"][k]), fig(q[k]["steps_per_s"]),
                 cpu(q[k], "server"), cpu(q[k], "peer"), str(q[k]["evolution_rounds"])]
                for k in ("a", "b", "c")]
        out += [f"  RLGym pipeline, {kind} models ({q['models']}): environment, "
                f"M={c['models']} models, aggregation, evolution as swergio clients",
                *table(["", "set-up", "steps", "steps/s", "server CPU", "agg CPU",
                        "evolution rounds"], rows),
                f"  c/a {q['ratio_c_a_steps_per_s']:.1f}x, "
                f"b/a {q['ratio_b_a_steps_per_s']:.2f}x, "
                f"c/b {q['ratio_c_b_steps_per_s']:.1f}x steps/s", ""]
    out.append(f"  ({c['clients']}; {c['threads']})")
    return out


def kernel(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    batches = [k for k in r["aggregate"][0] if k.startswith("batch_")] if r["aggregate"] else []
    rows = [[str(row["actions"]), str(row["models"]), fig(row["single_us_per_window"]),
             *(fig(row[k]) for k in batches)] for row in r["aggregate"]]
    heads = [f"W={k.split('_')[1]} µs/window" for k in batches]
    out = [(f"kernel: {c['strategy']}, sampling, B={c['batch_B']}, torch threads "
            f"{c['torch_threads']}"),
           *table(["A", "M", "1 window/call µs", *heads], rows)]
    drows = [[str(d["actions"]), f"{d['message_bytes']:,}", fig(d["decode_us"]),
              fig(d["orjson_loads_us"]), f"{d['binary_bytes']:,}",
              fig(d["binary_decode_us"])] for d in r["decode"]]
    out += ["", *table(["A", "JSON bytes", "decode+parse µs/msg", "orjson.loads µs/msg",
                        "binary bytes", "binary decode+parse µs/msg"], drows)]
    return out


def metrics(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    rows = []
    for row in r["rows"]:
        for state in ("on", "off"):
            s = row[state]
            rows.append([row["mode"], str(row["actions"]), state, fig(s["steps_per_s"]),
                         fig(s.get("p50_us")), fig(s.get("p99_us")), cpu(s)])
        rows.append(["", "", "on/off", f"{row['ratio_steps_per_s']:.3f}x",
                     f"{row['ratio_p50']:.3f}x", "", ""])
    return [f"metrics: on = {c['on']}", f"  off = {c['off']}",
            *table(["mode", "A", "metrics", "steps/s", "p50 µs", "p99 µs", "peer CPU"],
                   rows),
            (f"  instrumentation (the Metrics calls of one lockstep window, in process): "
             f"{fig(r['instrumentation_us_per_window'])} µs/window")]


def _wire(name: str) -> Callable[[dict[str, Any]], list[str]]:
    def render(r: dict[str, Any]) -> list[str]:
        from . import report_wire

        out: list[str] = getattr(report_wire, name)(r)
        return out
    return render


RENDER: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "zmq_lockstep": _wire("zmq_lockstep"), "zmq_pipelined": _wire("zmq_pipelined"),
    "cost": _wire("cost"),
    "swergio_lockstep": swergio_lockstep, "kernel": kernel, "metrics": metrics,
    "swergio_server": swergio_server,
}


def render(sections: dict[str, Any]) -> str:
    out: list[str] = []
    for name, result in sections.items():
        if "error" in result:
            out += [f"{name}: FAILED: {result['error']}", ""]
            continue
        out += [*RENDER[name](result), ""]
    return "\n".join(out)
