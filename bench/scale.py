"""Scale on paper: the cores a rate of environment steps needs, from measured CPU per step.

    python -m bench.scale --bench bench/results/latest.json \\
        --nats 8:bench/results/nats-m8.json 20:bench/results/nats-m20.json \\
               8:bench/results/nats-m8-r3.json 20:bench/results/nats-m20-r3.json

Inputs, all measured, none typed in:
- the worker's CPU per step on ZeroMQ: `python -m bench` (section `cost`: /proc CPU time
  per window over a fixed keyed workload, JSON logits, A = 18, at M = 8 and M = 20), and
  the size of one such logits message;
- on NATS, the worker's and the server's CPU per step: `python -m bench.nats_bench
  --models M --json FILE` (its case `nats` with one worker, the median over its repeats).
  A case's `replicas` says R1 or R3 (`--replicas 3`: three clustered servers, their CPU
  summed, each node's beside it); a case without it ran one server: R1. `--nats` may name
  an M twice, once for each.

`--costs FILE` writes (or, alone, reads) the distilled figures, so the table can be
rendered again from them. Where R3 was not measured, its server cores are estimated as
three times R1's (each replica stores and acknowledges every message) and shown with `≈`.

What limits a rate first is the lowest of these ceilings (the assumptions are flags):
one ZeroMQ worker is one process on one core; NATS spreads the windows over P partitions,
one worker each (a worker is one core); every partition is one stream, whose leader takes
every message on one server machine (`--server-cores`); at R3 (measured), the busiest of
the three nodes on its machine; and the logits arrive over one link (`--link-gbit`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RATES = (10_000, 100_000, 1_000_000)
MODELS = (8, 20)


@dataclass(frozen=True)
class Assumptions:
    partitions: int = 8            # transport.nats.partitions, the default
    server_cores: int = 16         # a server machine's cores (the stream leader's)
    link_gbit: float = 10.0        # the logits' link into the cluster


def load_nats(specs: Sequence[str]) -> dict[int, list[dict[str, Any]]]:
    """`M:FILE` arguments: each M's cases, over every file given for it (R1 and R3)."""
    nats: dict[int, list[dict[str, Any]]] = {}
    for spec in specs:
        m, _, path = spec.partition(":")
        nats.setdefault(int(m), []).extend(json.loads(Path(path).read_text()))
    return nats


def costs_from(bench: dict[str, Any], nats: dict[int, list[dict[str, Any]]]
               ) -> dict[str, Any]:
    """The figures the table needs (µs per step), from a bench run and nats_bench runs: on
    NATS the medians over the repeats of the case `nats` with one worker."""
    worker_zmq: dict[str, float] = {}
    for row in bench.get("sections", {}).get("cost", {}).get("rows", []):
        if row["actions"] == 18 and row["encoding"] == "json":
            worker_zmq[str(row["models"])] = row["worker"]["cpu_us_per_window"]["median"]
    size = None
    for row in bench.get("sections", {}).get("zmq_lockstep", {}).get("rows", []):
        if row["actions"] == 18 and row["encoding"] == "json":
            size = row["message_bytes"]
    worker_nats: dict[str, float] = {}
    server: dict[str, dict[str, float]] = {"R1": {}, "R3": {}}
    busiest: dict[str, float] = {}  # R3: the busiest node's share of the server's CPU
    for m, cases in nats.items():
        ones = [c for c in cases if c.get("case") == "nats" and c.get("workers") == 1]
        for replicas in server:
            runs = [c for c in ones if f"R{c.get('replicas', 1)}" == replicas]
            cpu = [c.get("cpu_ms_per_step", {}) for c in runs]
            if replicas == "R1" and any("worker" in x for x in cpu):
                worker_nats[str(m)] = 1e3 * statistics.median(
                    x["worker"] for x in cpu if "worker" in x)
            if any("server" in x for x in cpu):
                server[replicas][str(m)] = 1e3 * statistics.median(
                    x["server"] for x in cpu if "server" in x)
            nodes = [max(c["server_nodes_cpu_ms_per_step"]) for c in runs
                     if c.get("server_nodes_cpu_ms_per_step")]
            if replicas == "R3" and nodes:
                busiest[str(m)] = 1e3 * statistics.median(nodes)
    return {"actions": 18, "message_bytes": size, "worker_zmq_us": worker_zmq,
            "worker_nats_us": worker_nats, "server_us": server,
            "server_busiest_node_us": {"R3": busiest},
            "sources": {"worker_zmq_us": "python -m bench (cost: CPU per window, keyed, JSON)",
                        "nats": "python -m bench.nats_bench --models M [--replicas 3] "
                                "--json FILE"}}


def _cores(rate: float, us: float | None) -> float | None:
    return None if us is None else rate * us / 1e6


def _fmt(x: float | None, estimate: bool = False) -> str:
    if x is None:
        return "-"
    text = f"{x:,.0f}" if x >= 10 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"
    return ("≈" if estimate else "") + text


def _rate(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            v = x / scale
            return (f"{v:.0f}" if v >= 10 else f"{v:.2g}") + unit
    return f"{x:.0f}"


def _first(rate: float, ceilings: list[tuple[float, str]]) -> str:
    """The ceilings under `rate`, lowest first, or that none of them is reached."""
    over = sorted(c for c in ceilings if c[0] < rate)
    return "; then ".join(c[1] for c in over) if over else "fits"


def rows(costs: dict[str, Any], a: Assumptions = Assumptions()) -> list[list[str]]:
    out = []
    size = costs.get("message_bytes") or 0
    for m in MODELS:
        key = str(m)
        zmq = costs["worker_zmq_us"].get(key)
        nats = costs["worker_nats_us"].get(key)
        r1 = costs["server_us"].get("R1", {}).get(key)
        r3 = costs["server_us"].get("R3", {}).get(key)
        r3_node = costs.get("server_busiest_node_us", {}).get("R3", {}).get(key)
        r3_estimated = r3 is None and r1 is not None
        if r3_estimated:
            r3 = 3 * r1
        link: list[tuple[float, str]] = []
        if size:
            most = a.link_gbit * 1e9 / 8 / (m * size)
            link.append((most, f"a {a.link_gbit:g} Gbit/s link (≤ {_rate(most)} steps/s)"))
        on_zmq = list(link)
        if zmq:
            on_zmq.append((1e6 / zmq, f"one worker, one core (≤ {_rate(1e6 / zmq)} steps/s)"))
        on_nats = list(link)
        if nats:
            most = a.partitions * 1e6 / nats
            on_nats.append((most, f"P = {a.partitions} partitions, a worker each (≤ "
                                  f"{_rate(most)} steps/s)"))
        if r1:
            most = a.server_cores * 1e6 / r1
            on_nats.append((most, f"the stream leader's {a.server_cores} cores (≤ "
                                  f"{_rate(most)} steps/s at R1)"))
        if r3_node:
            most = a.server_cores * 1e6 / r3_node
            on_nats.append((most, f"the busiest node's {a.server_cores} cores (≤ "
                                  f"{_rate(most)} steps/s at R3)"))
        for rate in RATES:
            out.append([_rate(rate), str(m), _fmt(_cores(rate, zmq)),
                        _fmt(_cores(rate, nats)),
                        f"{_fmt(_cores(rate, r1))} / {_fmt(_cores(rate, r3), r3_estimated)}",
                        f"{rate * m * size / 1e6:,.0f} MB/s" if size else "-",
                        _first(rate, on_zmq), _first(rate, on_nats)])
    return out


def markdown(costs: dict[str, Any], a: Assumptions = Assumptions()) -> str:
    head = ["steps/s", "M", "worker cores, ZeroMQ", "worker cores, NATS",
            "NATS server cores, R1 / R3", "logits in", "ZeroMQ: what limits it (lowest first)",
            "NATS: what limits it (lowest first)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(costs, a)]
    return "\n".join(lines)


def per_step(costs: dict[str, Any]) -> str:
    """The measured inputs, one line."""
    def fig(d: dict[str, float]) -> str:
        return ", ".join(f"M = {k}: {v:,.0f} µs" for k, v in sorted(d.items(), key=lambda x:
                                                                     int(x[0])))
    r3 = costs["server_us"].get("R3") or {}
    busiest = costs.get("server_busiest_node_us", {}).get("R3") or {}
    missing = sorted(set(costs["server_us"]["R1"]) - set(r3), key=int)
    return (f"CPU per step (A = {costs['actions']}, JSON, {costs['message_bytes']} bytes a "
            f"message): worker on ZeroMQ {fig(costs['worker_zmq_us'])}; worker on NATS "
            f"{fig(costs['worker_nats_us'])}; NATS server R1 {fig(costs['server_us']['R1'])}"
            + (f"; R3 (the three nodes' sum) {fig(r3)}" if r3 else "")
            + (f", of it the busiest node {fig(busiest)}" if busiest else "")
            + (f"; R3 not measured at M = {', '.join(missing)} (≈ 3 × R1)" if r3 and missing
               else "" if r3 else "; R3 not measured (≈ 3 × R1)"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", type=Path, help="a `python -m bench` JSON (sections cost, "
                                              "zmq_lockstep)")
    p.add_argument("--nats", nargs="*", default=[], metavar="M:FILE",
                   help="`python -m bench.nats_bench --models M [--replicas 3] --json FILE` "
                        "results; an M may come twice (R1 and R3)")
    p.add_argument("--costs", type=Path, help="write the distilled figures here; read "
                                              "them from here when --bench is not given")
    p.add_argument("--partitions", type=int, default=Assumptions.partitions)
    p.add_argument("--server-cores", type=int, default=Assumptions.server_cores)
    p.add_argument("--link-gbit", type=float, default=Assumptions.link_gbit)
    args = p.parse_args(argv)
    if args.bench is not None:
        costs = costs_from(json.loads(args.bench.read_text()), load_nats(args.nats))
        if args.costs is not None:
            args.costs.write_text(json.dumps(costs, indent=1) + "\n")
    elif args.costs is not None:
        costs = json.loads(args.costs.read_text())
    else:
        p.error("give --bench (and --nats), or --costs")
    a = Assumptions(args.partitions, args.server_cores, args.link_gbit)
    print(markdown(costs, a))
    print()
    print(per_step(costs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
