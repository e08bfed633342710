"""swergio server section: `swergio_server` (opt-in: `python -m bench --only swergio_server`,
or on its own: `python -m bench.swergio_server_bench [--quick] [--repeats N]`).

Two measurements, each beside its baseline in the same run, a fresh server per run:

- `round_trip`: two unchanged swergio 0.0.2 clients (PyPI `Client`: header and body in
  two writes, Nagle's algorithm on) through the original server (`bench.peers
  swergio-server`, PyPI, unchanged) and through `swarm-aggregator swergio-server`. This
  process's client sends `{"N": i}` to room `ping`; an echo client in its own process
  (`bench.rlgym_peers echo`) answers in room `pong`; time from the send to the answer.
- `pipeline`: the RLGym example's components as swergio clients (`bench.rlgym_peers`:
  an environment, M = 6 models, the evolution component; each its own process, each
  writing header and body apart as the example's do) and an aggregator, in three set-ups:
  (a) original server + original aggregator (`bench.seed_aggregator`), (b) original
  server + the worker (`swarm-aggregator run`, transport swergio), (c) our server + the
  worker. This process is the example's control component: it asks the environment for
  `NR_OF_STEPS` steps in room `control` and times until the environment's `ENV_DONE`
  comes back; steps/s = steps / that time. After the timed steps, one evolution round
  (GET, weights, contributions, SET) checks that the whole example still works.

Every process of a pipeline runs with OMP_NUM_THREADS=1 (torch in the seed aggregator
and the worker: with 2 threads per process on 2 cores, torch's thread pool costs more than
the tiny sums it does). CPU is reported for the server and the aggregator.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from swergio import MESSAGE_TYPE, Client

from processor.apps.processes import free_port

from . import report, rlgym_peers
from . import swergio_wire as wire
from .common import (
    HOST,
    BenchError,
    Child,
    CpuMeter,
    Plan,
    Run,
    python,
    ratio,
    spawn,
    summarize,
    worker_env,
)

SERVERS = ("original", "ours")
SETUPS = {"a": ("original", "seed"), "b": ("original", "worker"), "c": ("ours", "worker")}
LABELS = {"a": "swergio server + original aggregator", "b": "swergio server + worker",
          "c": "swergio-server + worker"}
JOIN_TIMEOUT_S = 60.0
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


# -- processes ------------------------------------------------------------------------------


@contextmanager
def server(kind: str, stack: ExitStack) -> Iterator[tuple[int, Child]]:
    port = free_port()
    if kind == "original":  # it prints a line per message: stdout to /dev/null
        argv = python("-m", "bench.peers", "swergio-server", "--host", HOST, "--port",
                      str(port))
    else:
        argv = python("-m", "processor", "swergio-server", "--host", HOST, "--port", str(port))
    child = stack.enter_context(spawn(f"{kind} server", argv, ONE_THREAD,
                                      stdout_devnull=kind == "original"))
    if not wire.wait_server(HOST, port, 30.0):
        child.check()
        raise BenchError(f"the {kind} swergio server did not come up")
    yield port, child


def peer(stack: ExitStack, port: int, role: str, *args: str) -> Child:
    return stack.enter_context(spawn(f"{role}{''.join(args[-1:])}", python(
        "-m", "bench.rlgym_peers", role, "--host", HOST, "--port", str(port), *args),
        ONE_THREAD))


def aggregator(stack: ExitStack, kind: str, port: int, models: int) -> Child:
    if kind == "seed":  # it prints every contribution it sends: stdout to /dev/null
        return stack.enter_context(spawn("seed aggregator", python(
            "-m", "bench.seed_aggregator", "--host", HOST, "--port", str(port), "--models",
            str(models)), ONE_THREAD, stdout_devnull=True))
    env = worker_env(transport__kind="swergio", transport__swergio__host=HOST,
                     transport__swergio__port=port, window__models=models,
                     window__timeout_ms=0, metrics__port=0)
    return stack.enter_context(spawn("worker", python("-m", "processor", "run"),
                                     {**env, **ONE_THREAD}))


class Control:
    """This process's swergio Client (as the example's control component): in `control`
    and, as every swergio client, in `_command`, where it sees everyone's joins. A thread
    reads; the driver waits on the queue."""

    def __init__(self, port: int, name: str, rooms: Sequence[str]) -> None:
        self.port = port
        self.client = Client(name, HOST, port, "utf-8", 10)
        for room in rooms:
            self.client.join_room(room)
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        # (NAME, ROOM) -> joins seen: every model registers as `model`, so they are counted.
        self.joins: Counter[tuple[str, str]] = Counter()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._sync()

    def _read(self) -> None:
        while True:
            msg = self.client.receive()
            if msg is False:
                return
            if msg.get("TYPE") == MESSAGE_TYPE.COMMAND.JOINROOM.id:
                self.joins[(str(msg.get("SENT_BY")), str(msg.get("ROOM")))] += 1
            else:
                self.inbox.put(msg)

    def _sync(self) -> None:
        """Return once this client is in `_command` on the server (it then sees the joins
        of every client started after): probes join a room until one join is seen."""
        end = time.monotonic() + JOIN_TIMEOUT_S
        while time.monotonic() < end:
            name = f"probe-{uuid.uuid4().hex[:8]}"
            probe = wire.Connection(HOST, self.port, name, ("_probe",))
            try:
                until = time.monotonic() + 0.5
                while time.monotonic() < until:
                    if self.joins[(name, "_probe")]:
                        return
                    time.sleep(0.005)
            finally:
                probe.close()
        raise BenchError("the control client never saw a join")

    def send(self, room: str, **fields: Any) -> None:
        self.client.send({"ID": uuid.uuid4().hex, "TYPE": MESSAGE_TYPE.DATA.CUSTOM.id,
                          "TO_ROOM": room, **fields})

    def wait_joined(self, joins: dict[tuple[str, str], int], children: Sequence[Child]
                    ) -> None:
        end = time.monotonic() + JOIN_TIMEOUT_S
        while missing := {k: n for k, n in joins.items() if self.joins[k] < n}:
            for c in children:
                c.check()
            if time.monotonic() > end:
                raise BenchError(f"still waiting for joins (NAME, ROOM): count {missing}")
            time.sleep(0.02)

    def wait_for(self, status: str, timeout: float, children: Sequence[Child]
                 ) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            try:
                msg = self.inbox.get(timeout=0.1)
            except queue.Empty:
                for c in children:
                    c.check()
                if time.monotonic() > end:
                    raise BenchError(f"no {status} within {timeout:.0f} s") from None
                continue
            if msg.get("STATUS") == status:
                return msg

    def close(self) -> None:
        rlgym_peers.close(self.client, self._thread)


# -- round trips ---------------------------------------------------------------------------


def round_trips(kind: str, rounds: int, warmup: int, max_s: float) -> Run:
    with ExitStack() as stack:
        port, srv = stack.enter_context(server(kind, stack))
        ping = Control(port, "ping", ("pong",))
        stack.callback(ping.close)
        echo = peer(stack, port, "echo")
        ping.wait_joined({("pong", "ping"): 1}, [srv, echo])
        client = ping.client
        inbox = ping.inbox
        latencies: list[int] = []
        meter = CpuMeter(server=srv.pid, peer=echo.pid)
        start = time.perf_counter_ns()
        for i in range(-warmup, rounds):
            if i == 0:
                meter.start()
                start = time.perf_counter_ns()
            t0 = time.perf_counter_ns()
            client.send({"ID": uuid.uuid4().hex, "TYPE": MESSAGE_TYPE.DATA.CUSTOM.id,
                         "TO_ROOM": "ping", "N": i})
            while True:
                try:
                    msg = inbox.get(timeout=10)
                except queue.Empty:
                    srv.check()
                    echo.check()
                    raise BenchError(f"{kind}: no answer to round trip {i}") from None
                if msg.get("N") == i:
                    break
            t1 = time.perf_counter_ns()
            if i >= 0:
                latencies.append(t1 - t0)
                if t1 - start > max_s * 1e9:
                    break
        seconds = (time.perf_counter_ns() - start) / 1e9
        return meter.stop(Run(len(latencies), seconds, latencies_ns=latencies))


# -- the RLGym pipeline --------------------------------------------------------------------


@dataclass
class PipelineRun:
    run: Run
    episodes: int
    evolved: bool


def pipeline(setup: str, models: int, steps: int, warmup: int, timeout: float,
             torch_models: bool) -> PipelineRun:
    server_kind, agg_kind = SETUPS[setup]
    with ExitStack() as stack:
        port, srv = stack.enter_context(server(server_kind, stack))
        control = Control(port, "control", ("control",))
        stack.callback(control.close)
        children = [srv]
        children.append(peer(stack, port, "evolution", "--models", str(models)))
        children.append(peer(stack, port, "environment"))
        for m in range(models):
            extra = ("--torch",) if torch_models else ()
            children.append(peer(stack, port, "model", *extra, "--index", str(m)))
        agg = aggregator(stack, agg_kind, port, models)
        children.append(agg)
        joins = {("environment", room): 1 for room in ("control", "observation", "action")}
        joins |= {("evolution", room): 1 for room in ("control", "evolution")}
        joins |= {("model", room): models for room in ("observation", "logits", "evolution")}
        joins |= {("aggregation", room): 1 for room in ("logits", "action", "evolution")}
        control.wait_joined(joins, children)
        if warmup:
            control.send("control", NR_OF_STEPS=warmup, DETERMINISTIC=False)
            control.wait_for("ENV_DONE", timeout, children)
        meter = CpuMeter(server=srv.pid, peer=agg.pid)
        meter.start()
        t0 = time.perf_counter_ns()
        control.send("control", NR_OF_STEPS=steps, DETERMINISTIC=False)
        done = control.wait_for("ENV_DONE", timeout, children)
        seconds = (time.perf_counter_ns() - t0) / 1e9
        run = meter.stop(Run(int(done["STEPS"]), seconds, messages=int(done["STEPS"]) * models))
        control.send("control", EVOLUTION=True)
        control.wait_for("EVO_DONE", timeout, children)
        return PipelineRun(run, int(done["EPISODES"]), True)


# -- the section ---------------------------------------------------------------------------


MODEL_KINDS = {"numpy": "the example's network shape, numpy forward pass, no training",
               "torch": "torch actor-critic of that shape, trained every 5 steps (A2C)"}


def section(plan: Plan) -> dict[str, Any]:
    rt: dict[str, list[Run]] = {k: [] for k in SERVERS}
    pipe: dict[str, dict[str, list[PipelineRun]]] = {
        kind: {k: [] for k in SETUPS} for kind in MODEL_KINDS}
    steps = {"numpy": {"a": plan.rlgym_steps_slow, "b": plan.rlgym_steps_slow,
                       "c": plan.rlgym_steps_fast},
             "torch": {"a": plan.rlgym_steps_slow, "b": plan.rlgym_steps_slow,
                       "c": plan.rlgym_torch_steps_fast}}
    for _ in range(plan.repeats):
        for kind in SERVERS:
            rt[kind].append(round_trips(
                kind, plan.server_rounds, plan.server_rounds_warmup,
                plan.server_rounds_max_s))
        for models_kind, runs in pipe.items():
            for setup in SETUPS:
                runs[setup].append(pipeline(
                    setup, plan.rlgym_models, steps[models_kind][setup], plan.rlgym_warmup,
                    plan.rlgym_timeout_s, torch_models=models_kind == "torch"))
    rts = {k: summarize(v) for k, v in rt.items()}
    pipelines: dict[str, Any] = {}
    for models_kind, runs in pipe.items():
        s = {k: summarize([p.run for p in v]) for k, v in runs.items()}
        for k, v in runs.items():
            s[k]["episodes"] = sum(p.episodes for p in v)
            s[k]["evolution_rounds"] = sum(p.evolved for p in v)
        pipelines[models_kind] = {
            **s, "models": MODEL_KINDS[models_kind], "steps": steps[models_kind],
            "ratio_c_a_steps_per_s": ratio(s["c"], s["a"], "steps_per_s"),
            "ratio_b_a_steps_per_s": ratio(s["b"], s["a"], "steps_per_s"),
            "ratio_c_b_steps_per_s": ratio(s["c"], s["b"], "steps_per_s")}
    return {
        "config": {
            "repeats": plan.repeats, "models": plan.rlgym_models, "setups": LABELS,
            "clients": "swergio 0.0.2 Client, unchanged: header and body in two writes, "
                       "Nagle on",
            "round_trip": "this process's Client -> server -> echo Client (own process) "
                          "-> server -> this process",
            "threads": "OMP_NUM_THREADS=1 in every process of a pipeline",
        },
        "round_trip": {**rts,
                       "ratio_original_ours_p50": ratio(rts["original"], rts["ours"],
                                                        "p50_us")},
        "pipeline": pipelines,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.swergio_server_bench",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one repeat, few steps")
    p.add_argument("--repeats", type=int, help="repeats of every figure (default 3)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    plan = (Plan.quick() if args.quick else Plan()).with_repeats(args.repeats)
    result = section(plan)
    print("\n".join(report.swergio_server(result)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
