"""The printed tables of `zmq_lockstep`, `zmq_pipelined` and `cost` (see `bench.report`)."""

from __future__ import annotations

from typing import Any

from .report import LATENCY_HEADER, cpu, fig, latency, num, table


def spread(runs: list[float], digits: int = 2) -> str:
    """`median [min-max]` of per-repeat ratios."""
    xs = sorted(runs)
    if not xs:
        return "-"
    n = len(xs)
    med = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    if n == 1:
        return f"{med:.{digits}f}x"
    return f"{med:.{digits}f}x [{xs[0]:.{digits}f}-{xs[-1]:.{digits}f}]"


def _workers(row: dict[str, Any]) -> list[str]:
    return [k for k in ("worker", "before") if k in row]


def zmq_lockstep(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    rows = []
    for row in r["rows"]:
        for name in (*_workers(row), "transport", "pingpong"):
            if name not in row:
                continue
            s = row[name]
            rows.append([str(row["actions"]), row["encoding"], name, fig(s["steps_per_s"]),
                         *latency(s), cpu(s)])
        for name in _workers(row):
            rows.append(["", "", f"{name}/pingpong",
                         f"{row[name]['ratio_steps_per_s']:.2f}x steps/s",
                         spread(row[name]["ratio_p50_runs"]) + " p50", "", "", "", ""])
    out = [(f"zmq_lockstep: M={c['models']}, lockstep, metrics {c['metrics']}; "
            f"latency: {c['latency']}; ratios repeat by repeat, median [min-max]"),
           *table(["A", "frames", "peer", "steps/s", *LATENCY_HEADER, "peer CPU"], rows)]
    out += ["", "  where a lockstep window's microseconds go (p50, µs): the ping-pong's wire; the "
                "receive path (the worker's transport and event loop answering without work, "
                "minus the ping-pong); the worker's own parts (in process, thread CPU time: "
                "what is left of the M - 1 earlier messages when the driver has published the "
                "last, the last message up to the action); the rest",
            *table(["A", "frames", "worker p50", "wire", "receive path", "earlier msgs left",
                    "last msg -> action", "of it: decode", "of it: aggregate", "rest",
                    "books after"], [_breakdown(row) for row in r["rows"]])]
    traced = [row for row in r["rows"] if row["breakdown"].get("traced")]
    if traced:
        out += ["", "  the same, seen from inside the worker (one more run, on a worker that notes "
                    "its receives and actions: bench/trace_hook; p50, µs): the driver's last "
                    "publish -> the worker has read the last message -> the action handed to "
                    "ZeroMQ -> the driver has it; and how many of the window's messages were "
                    "read only after the last publish",
                *table(["A", "frames", "in", "worker", "out", "late msgs", "windows"],
                       [_traced(row) for row in traced])]
    return out


def _traced(row: dict[str, Any]) -> list[str]:
    t = row["breakdown"]["traced"]
    return [str(row["actions"]), row["encoding"], *(num(t[k]) if t[k] is not None else "-"
                                                     for k in ("in_us", "worker_us", "out_us")),
            f"{t['late']:g}" if t["late"] is not None else "-", f"{t['windows']}/{t['of']}"]


def breakdown_parts(row: dict[str, Any]) -> dict[str, float]:
    """The lockstep latency's parts (µs): the floor, the receive path, the worker's own.

    The earlier M - 1 messages delay the action only by what is left of their decoding when
    the driver publishes the last one (their CPU time beyond the driver's publishing time).
    """
    b = row["breakdown"]
    total = row["worker"]["p50_us"]["median"]
    floor = row["pingpong"]["p50_us"]["median"]
    transport = row["transport"]["p50_us"]["median"] if "transport" in row else floor
    backlog = max(0.0, b["earlier_messages_us"] - row["send_span_us"])
    own = b["last_message_to_action_us"]
    return {"latency": total, "wire": floor, "receive": transport - floor,
            "send_span": row["send_span_us"], "earlier": b["earlier_messages_us"],
            "backlog": backlog, "to_action": own, "decode": b["last_message_decode_us"],
            "aggregate": b["aggregate_us"], "rest": total - transport - backlog - own,
            "books": b["books_after_action_us"]}


def _breakdown(row: dict[str, Any]) -> list[str]:
    p = breakdown_parts(row)
    return [str(row["actions"]), row["encoding"], num(p["latency"]), num(p["wire"]),
            num(p["receive"]), num(p["backlog"]), num(p["to_action"]), num(p["decode"]),
            num(p["aggregate"]), num(p["rest"]), num(p["books"])]


def zmq_pipelined(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    rows = []
    for row in r["rows"]:
        for name in (*_workers(row), "raw"):
            s = row[name]
            rows.append([str(row["actions"]), row["encoding"], name, fig(s["messages_per_s"]),
                         fig(s["steps_per_s"]), fig(s.get("p50_us")), str(s["lost"]),
                         cpu(s), cpu(s, "driver")])
        for name in _workers(row):
            extra = ""
            if "binary_over_json_runs" in row[name]:
                extra = f"binary/JSON {spread(row[name]['binary_over_json_runs'])} steps/s"
            rows.append(["", "", f"{name}/raw", spread(row[name]["ratio_runs"]) + " msgs/s",
                         extra, "", "", "", ""])
    return [(f"zmq_pipelined: M={c['models']}, key {c['key']}, K={c['inflight_windows']} "
             f"windows in flight, metrics {c['metrics']}; raw: {c['raw']}; ratios repeat "
             "by repeat, median [min-max]"),
            *table(["A", "frames", "peer", "logits msgs/s", "steps/s", "p50 µs (queued)",
                    "lost", "peer CPU", "driver CPU"], rows)]


def cost(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    rows = []
    for row in r["rows"]:
        for name in _workers(row):
            i = row[name]["instructions"]
            rows.append([str(row["models"]), str(row["actions"]), row["encoding"], name,
                         f"{i['worker'] / 1e3:,.0f}k" if i else "-",
                         f"{i['harness'] / 1e3:,.0f}k" if i else "-",
                         fig(row[name]["cpu_us_per_window"])])
        if "before" in row and row["worker"]["instructions"]:
            w, b = row["worker"], row["before"]
            ins = w["instructions"]["worker"] / b["instructions"]["worker"]
            cpu_ratio = w["cpu_us_per_window"]["median"] / b["cpu_us_per_window"]["median"]
            rows.append(["", "", "", "worker/before", f"{ins:.2f}x", "", f"{cpu_ratio:.2f}x"])
    return [f"cost per window: instructions = {c['instructions']}; harness: the models and "
            "environment in the same process, not counted in the worker's",
            f"  CPU = {c['cpu']}",
            *table(["M", "A", "frames", "worker", "instructions/window", "harness",
                    "CPU µs/window"], rows)]
