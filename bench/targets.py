"""Issue 14's targets, each with its ratio as measured in this run (median [min-max] over
the repeats, each repeat's ratio taken from measurements made back to back), and the
instruction counts beside them. `python -m bench` prints this after the sections and
writes it under `targets` in the JSON; `render(targets(sections))` reprints a saved run.
"""

from __future__ import annotations

from typing import Any

from .common import stat
from .report import num, table


def _spread(runs: list[float]) -> dict[str, Any] | None:
    return stat(runs) if runs else None


def _row(name: str, goal: str, at_most: float | None, at_least: float | None,
         figure: dict[str, Any] | None, unit: str = "x") -> dict[str, Any]:
    ok = None
    if figure is not None:
        m = figure["median"]
        ok = (at_most is None or m <= at_most) and (at_least is None or m >= at_least)
    return {"target": name, "goal": goal, "figure": figure, "unit": unit, "met": ok}


def _lockstep(lock: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for row in lock.get("rows", []):
        a, enc = row["actions"], row["encoding"]
        target = _row(f"lockstep p50 / ZeroMQ ping-pong, A = {a}, {enc}", "<= 1.6x", 1.6,
                      None, _spread(row["worker"].get("ratio_p50_runs", [])))
        # Below this ratio no worker in Python can go: the ping-pong plus the parse of the M
        # texts (orjson.loads, measured in this run) that cannot overlap the driver's sending.
        target["floor"] = row.get("floor_ratio_p50")
        out.append(target)
        if "before" in row:
            out.append(_row(f"  before (--before), A = {a}, {enc}", "", None, None,
                            _spread(row["before"].get("ratio_p50_runs", []))))
    for row in lock.get("rows", []):
        if row["actions"] == 18 and row["encoding"] == "json":
            out.append(_row("lockstep p99, A = 18, json", "< 1,000 µs", 999.999, None,
                            row["worker"].get("p99_us"), unit=" µs"))
            if "before" in row:
                out.append(_row("  before (--before)", "", None, None,
                                row["before"].get("p99_us"), unit=" µs"))
    return out


def _pipelined(pipe: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for row in pipe.get("rows", []):
        a, enc = row["actions"], row["encoding"]
        # The goals: JSON at A = 18 (from 0.50x), binary at A = 18 and 1000.
        goal = (">= 0.65x", 0.65) if enc == "binary" or a == 18 else ("", None)
        out.append(_row(f"pipelined msgs/s / its bare receiver, A = {a}, {enc}", goal[0],
                        None, goal[1], _spread(row["worker"].get("ratio_runs", []))))
        if "before" in row:
            out.append(_row(f"  before (--before), A = {a}, {enc}", "", None, None,
                            _spread(row["before"].get("ratio_runs", []))))
        if enc == "binary":
            goal = (">= 1.0x", 1.0) if a == 18 else ("", None)
            out.append(_row(f"pipelined steps/s binary / JSON, A = {a}", goal[0], None,
                            goal[1], _spread(row["worker"].get("binary_over_json_runs", []))))
            if "before" in row:
                out.append(_row(f"  before (--before), A = {a}", "", None, None,
                                _spread(row["before"].get("binary_over_json_runs", []))))
    return out


def _cost(cost: dict[str, Any]) -> list[dict[str, Any]]:
    """Instructions, then CPU time, per window: each followed by the earlier checkout's."""
    out = []
    for row in cost.get("rows", []):
        case = f"M = {row['models']}, A = {row['actions']}, {row['encoding']}"
        kinds = [k for k in ("worker", "before") if k in row]
        if row["worker"]["instructions"]:
            for k in kinds:
                label = "" if k == "worker" else "  before: "
                out.append(_row(f"{label}instructions per window, {case}", "", None, None,
                                stat([row[k]["instructions"]["worker"]]), unit=""))
        for k in kinds:
            label = "" if k == "worker" else "  before: "
            out.append(_row(f"{label}CPU per window, {case}", "", None, None,
                            row[k]["cpu_us_per_window"], unit=" µs"))
    return out


# Issue 14, point 2 (the nats section, `bench.nats_bench`): the ratio's name there ->
# (target, goal, at most, at least); ratios taken within each repeat.
NATS_TARGETS: dict[str, tuple[str, str, float | None, float | None]] = {
    "worker_cpu_over_zmq": ("NATS worker CPU per step / ZeroMQ's", "<= 1.2x", 1.2, None),
    "before_worker_cpu_over_zmq": ("  before (--before)", "", None, None),
    "server_cpu_over_before": ("NATS server CPU per step / before's (--before)", "<= 0.5x",
                               0.5, None),
    "steps_over_zmq": ("NATS steps/s, 1 worker / ZeroMQ's", ">= 0.6x", None, 0.6),
    "before_steps_over_zmq": ("  before (--before)", "", None, None),
}


def _nats(nats: dict[str, Any]) -> list[dict[str, Any]]:
    ratios = nats.get("ratios", {})
    return [_row(name, goal, at_most, at_least, _spread(ratios[k]))
            for k, (name, goal, at_most, at_least) in NATS_TARGETS.items() if ratios.get(k)]


def targets(sections: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets found in these sections (a section that did not run adds none)."""
    return (_lockstep(sections.get("zmq_lockstep", {}))
            + _pipelined(sections.get("zmq_pipelined", {}))
            + _cost(sections.get("cost", {}))
            + _nats(sections.get("nats", {})))


def _fig(f: dict[str, Any] | None, unit: str) -> str:
    if f is None:
        return "-"
    if unit == "x":
        body = f"{f['median']:.2f}x"
        if len(f["runs"]) > 1:
            body += f" [{f['min']:.2f}-{f['max']:.2f}]"
        return body
    body = num(f["median"]) + unit
    if len(f["runs"]) > 1:
        body += f" [{num(f['min'])}-{num(f['max'])}]"
    return body


def render(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    lines = [[r["target"], r["goal"], _fig(r["figure"], r["unit"]),
              "" if r["met"] is None or not r["goal"] else ("met" if r["met"] else "NOT met"),
              f"{r['floor']:.2f}x" if r.get("floor") else ""]
             for r in rows]
    return "\n".join(["targets (issue 14), measured in this run: median [min-max] of the "
                      "repeats' ratios; met or not on the median; floor: the ping-pong plus "
                      "the parse alone of the window's texts (orjson.loads) that cannot "
                      "overlap the driver's sending",
                      *table(["target", "goal", "measured", "", "floor"], lines)])
