"""ZeroMQ peers and JSON drivers, and the `metrics` section (the sections `zmq_lockstep`
and `zmq_pipelined`, JSON and binary frames, are `bench.zmq_wire`'s, on these peers).

The driver (this process) plays the environment and the M models with a client swarm
(`processor.client`): a PUB socket connected to the peer's SUB, a SUB socket connected to
the peer's PUB, the slow joiner waited out by its `ready()`; in the timed loops every
message is encoded before the clock starts and its sockets are used raw. The peer is the
worker (`python -m processor run`, configured by SWARM_AGG__* variables) or a baseline from
`bench.peers` with the same sockets, driven by the same code:

- lockstep: send a window's M messages, wait for its action, repeat. Latency is from the
  publish of the window's last message to the action's arrival. Baseline: the ZeroMQ
  ping-pong (`zmq-echo` without parsing), the floor of that latency.
- pipelined: keyed windows (ENV_ID, STEP), credit-based: K windows are kept outstanding,
  a new window's M messages go out when an action comes back, so the worker runs as fast
  as it can without any queue growing past K windows (nothing can be dropped by a
  high-water mark). Baseline: `zmq-echo --parse`, a bare receiver that only does
  recv_multipart + orjson.loads (the raw ceiling). Latency here includes the queueing
  behind the other K - 1 windows.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import zmq

from processor.apps.processes import free_port
from processor.client import NoReply, Swarm
from processor.config import from_mapping

from .common import (
    HOST,
    ROOT,
    BenchError,
    Child,
    Plan,
    Run,
    python,
    ratio,
    spawn,
    summarize,
    worker_env,
)

HANDSHAKE_TIMEOUT_S = 60.0


@dataclass
class Link:
    pub: zmq.Socket[bytes]
    sub: zmq.Socket[bytes]


@dataclass
class Peer:
    """A peer process and the driver's client swarm (processor.client) towards it. The
    timed loops use the swarm's two sockets raw (`Link`): pre-encoded frames out, actions
    read without the inbox, so only the wire and the peer are measured."""

    child: Child
    swarm: Swarm
    link: Link


def handshake(swarm: Swarm, children: Sequence[Child],
              timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
    """ready() (PEEK until answered: the slow joiner) while the peers live; then the late
    answers to the earlier PEEKs are read, so none waits in the queue of a timed loop."""
    end = time.monotonic() + timeout
    while True:
        for c in children:
            c.check()
        try:
            swarm.ready(timeout=0.5)
            break
        except NoReply:
            if time.monotonic() > end:
                raise BenchError(f"no answer to PEEK within {timeout:.0f} s") from None
    _, sub = swarm.zmq_sockets()
    while sub.poll(200):
        sub.recv_multipart()


@contextmanager
def peer(kind: str, plan: Plan, keyed: bool = False, metrics_port: int = 0,
         trace: Path | None = None) -> Iterator[Peer]:
    """`worker`, `pingpong` (zmq-echo) or `raw` (zmq-echo --parse), connected and answering;
    `before`: the worker of the checkout `plan.before`; `transport`: bench.transport_echo.
    `trace` (a worker): the file its receives and actions are noted in when it exits
    (bench/trace_hook)."""
    sub_ep = f"tcp://{HOST}:{free_port()}"
    pub_ep = f"tcp://{HOST}:{free_port()}"
    root = ROOT
    if kind in ("worker", "before"):
        if kind == "before":
            root = Path(plan.before)  # the worker of an earlier checkout (--before)
        keys: dict[str, Any] = {"transport__zmq__sub": sub_ep,
                                "transport__zmq__pub": pub_ep,
                                "window__models": plan.models, "window__timeout_ms": 0,
                                "metrics__port": metrics_port}
        if keyed:
            keys["window__key"] = ["ENV_ID", "STEP"]
        argv = python("-m", "processor", "run")
        env = worker_env(**keys)
        if trace is not None:
            env["SWARM_BENCH_TRACE"] = str(trace)
            env["PYTHONPATH"] = str(ROOT / "bench" / "trace_hook")
    elif kind == "transport":  # the worker's transport and loop, no work (lockstep)
        argv = python("-m", "bench.transport_echo", "--sub", sub_ep, "--pub", pub_ep,
                      "--models", str(plan.models))
        env = {}
    else:
        argv = python("-m", "bench.peers", "zmq-echo", "--sub", sub_ep, "--pub", pub_ep,
                      "--models", str(plan.models))
        if kind == "raw":
            argv.append("--parse")
        env = {}
    # The peers' side of the worker's config; unbounded queues: the drivers bound what is
    # in flight, so nothing is dropped at a high-water mark.
    cfg = from_mapping({"transport": {"zmq": {"sub": sub_ep, "pub": pub_ep, "sndhwm": 0,
                                              "rcvhwm": 0}}})
    with spawn(kind, argv, env, root=root) as child, Swarm(cfg) as swarm:
        swarm.environment()
        pub, sub = swarm.zmq_sockets()
        sub.setsockopt(zmq.RCVTIMEO, int(plan.action_timeout_s * 1000))
        handshake(swarm, [child])
        yield Peer(child, swarm, Link(pub, sub))


# -- drivers -------------------------------------------------------------------------------


# -- metrics scraping ----------------------------------------------------------------------


class Scraper:
    """Reads /metrics every `interval` seconds from a thread, as Prometheus would."""

    def __init__(self, port: int, interval: float) -> None:
        self.url = f"http://{HOST}:{port}/metrics"
        self.interval = interval
        self.scrapes = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scraper", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:  # the first scrape at once: even a short run is scraped
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    r.read()
                self.scrapes += 1
            except OSError:
                self.failures += 1
            if self._stop.wait(self.interval):
                return


# -- sections ------------------------------------------------------------------------------


def metrics_section(plan: Plan) -> dict[str, Any]:
    from . import zmq_wire as wire  # (it builds on this module: imported here, not above)

    a = plan.metrics_actions
    rows = []
    for mode in ("lockstep", "pipelined"):
        runs: dict[str, list[Run]] = {"on": [], "off": []}
        scrapes = failures = 0
        mport = free_port()
        with ExitStack() as stack:
            peers = {
                "on": stack.enter_context(peer("worker", plan, keyed=mode == "pipelined",
                                               metrics_port=mport)),
                "off": stack.enter_context(peer("worker", plan, keyed=mode == "pipelined")),
            }
            for rep in range(plan.metrics_repeats):
                for state in ("on", "off"):
                    target = peers[state]
                    with ExitStack() as scraping:
                        if state == "on":
                            scraper = scraping.enter_context(
                                Scraper(mport, plan.scrape_interval_s))
                        if mode == "lockstep":
                            run, _ = wire.run_lockstep(
                                target, wire.lockstep_frames(plan.models, a, wire.JSON),
                                plan.lockstep_steps, plan.warmup_steps, plan.lockstep_max_s)
                        else:
                            keyed = wire.keyed_frames(plan.models, a, f"metrics-{state}-{rep}",
                                                      wire.JSON)
                            run = wire.run_pipelined(target, keyed, plan.inflight,
                                                     plan.pipelined_windows, plan.warmup_steps,
                                                     plan.pipelined_max_s)
                    if state == "on":
                        scrapes += scraper.scrapes
                        failures += scraper.failures
                    runs[state].append(run)
        on = summarize(runs["on"], messages=mode == "pipelined")
        off = summarize(runs["off"], messages=mode == "pipelined")
        on["scrapes"], on["scrape_failures"] = scrapes, failures
        rows.append({"mode": mode, "actions": a, "on": on, "off": off,
                     "ratio_steps_per_s": ratio(on, off, "steps_per_s"),
                     "ratio_p50": ratio(on, off, "p50_us")})
    from .kernel_bench import instrumentation_us_per_window

    return {"config": {
        "models": plan.models, "actions": a, "repeats": plan.metrics_repeats,
        "on": f"SWARM_AGG__METRICS__PORT=<free port>: the HTTP server thread runs and the "
              f"driver scrapes /metrics every {plan.scrape_interval_s:g} s from a thread",
        "off": "SWARM_AGG__METRICS__PORT=0: no HTTP server and no scrapes; the Metrics "
               "object still exists and the worker still updates every counter and "
               "histogram (see instrumentation_us_per_window for that cost)"},
        "rows": rows, "instrumentation_us_per_window": instrumentation_us_per_window(plan)}
