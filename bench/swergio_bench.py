"""swergio section: `swergio_lockstep`.

A fresh swergio 0.0.2 server (PyPI, unchanged, stdout to /dev/null: it prints a line per
message) for each aggregator measured, so no component of one run lingers in the next:

- `worker`: `python -m processor run` with SWARM_AGG__TRANSPORT__KIND=swergio;
- `seed`: the swergio RLGym example's aggregation component (`bench.seed_aggregator`: a
  real swergio Client, torch, `client.listen()`);
- `echo`: a component with no math that answers every M logits messages
  (`bench.peers swergio-echo --quickack`): what the server itself allows;
- `echo_plain`: the same without TCP_QUICKACK, which shows the delayed-acknowledgement stall
  that a component replying at once meets on this server (see `bench.swergio_wire`).

The driver is this one process, with plain blocking sockets speaking swergio framing
(`bench.swergio_wire`) over M + 1 connections, as in a real pipeline where every model and
the environment is its own client: one per model (`model-00`, ...), registered under its
own NAME and sending that model's logits, so the server runs one thread per model as it
would; and one for the environment, which joins the rooms `action` and `evolution`.

A logits message is what a swergio model component sends: ID, TYPE "DATA/CUSTOM", TO_ROOM
"logits", SENT_BY (swergio's Client adds it to a handler's reply; with it the server
forwards the bytes it received instead of re-encoding them), COMPONENT_ID, DETERMINISTIC
and LOGITS. Every frame is encoded before the clock starts and written in one `sendall`
with TCP_NODELAY. The environment's connection reads with TCP_QUICKACK: it only reads
while timed, and this rules out any acknowledgement delay on the driver's side.

Lockstep: the M frames of a step, then wait on the environment's connection for a frame
with an ACTION; latency from the last model's write to the action's arrival. Handshake:
GET in the room `evolution` until a CONTRIBUTION comes back. CPU is reported for the
aggregator and for the server (whose threads do the forwarding).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from processor.apps.processes import free_port

from . import payloads
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

HANDSHAKE_TIMEOUT_S = 60.0
ENVIRONMENT = "environment"
AGGREGATORS = ("worker", "seed", "echo", "echo_plain")


@dataclass
class Pipeline:
    server: Child
    aggregator: Child
    env: wire.Connection
    models: list[wire.Connection]


def aggregator_argv(kind: str, port: int, plan: Plan) -> tuple[list[str], dict[str, str]]:
    if kind == "worker":
        return python("-m", "processor", "run"), worker_env(
            transport__kind="swergio", transport__swergio__host=HOST,
            transport__swergio__port=port, window__models=plan.models,
            window__timeout_ms=0, metrics__port=0)
    if kind == "seed":
        return python("-m", "bench.seed_aggregator", "--host", HOST, "--port", str(port),
                      "--models", str(plan.models)), {}
    if kind in ("echo", "echo_plain"):
        argv = python("-m", "bench.peers", "swergio-echo", "--host", HOST, "--port",
                      str(port), "--models", str(plan.models))
        return argv + (["--quickack"] if kind == "echo" else []), {}
    raise ValueError(kind)


@contextmanager
def pipeline(kind: str, plan: Plan) -> Iterator[Pipeline]:
    """A server, the aggregator `kind`, and the driver's connections, handshake done."""
    port = free_port()
    with ExitStack() as stack:
        server = stack.enter_context(spawn(
            "swergio-server", python("-m", "bench.peers", "swergio-server", "--host", HOST,
                                     "--port", str(port)), stdout_devnull=True))
        if not wire.wait_server(HOST, port, 30.0):
            server.check()
            raise BenchError("the swergio server did not come up")
        # The environment first: its rooms exist before anyone sends to them. It reads with
        # QUICKACK, so the driver never delays an acknowledgement itself.
        env = wire.Connection(HOST, port, ENVIRONMENT, ("action", "evolution"),
                              timeout=plan.action_timeout_s, quickack=True)
        stack.callback(env.close)
        argv, extra = aggregator_argv(kind, port, plan)
        agg = stack.enter_context(spawn(kind, argv, extra, stdout_devnull=kind == "seed"))
        models = []
        for m in range(plan.models):
            conn = wire.Connection(HOST, port, payloads.model_id(m))
            stack.callback(conn.close)
            models.append(conn)
        _handshake(env, [server, agg])
        yield Pipeline(server, agg, env, models)


def _handshake(env: wire.Connection, children: list[Child]) -> None:
    get = wire.encode(wire.data("evolution", ENVIRONMENT, CMD="GET"))
    end = time.monotonic() + HANDSHAKE_TIMEOUT_S
    old = env.sock.gettimeout()
    env.sock.settimeout(0.1)
    try:
        while True:
            for c in children:
                c.check()
            if time.monotonic() > end:
                raise BenchError(f"no answer to GET within {HANDSHAKE_TIMEOUT_S:.0f} s")
            env.send(get)
            try:
                if b'"CONTRIBUTION"' in env.recv():
                    break
            except TimeoutError:
                continue
        # Later answers to the earlier GETs: read them now, not during the timed part.
        env.sock.settimeout(0.3)
        while True:
            try:
                env.recv()
            except TimeoutError:
                break
    finally:
        env.sock.settimeout(old)


def run_lockstep(p: Pipeline, frames: list[list[bytes]], steps: int, warmup: int,
                 max_s: float) -> Run:
    pool = len(frames)
    clock = time.perf_counter_ns
    sends = [c.sock.sendall for c in p.models]
    last_send = sends[-1]
    recv = p.env.recv
    latencies: list[int] = []
    meter = CpuMeter(peer=p.aggregator.pid, server=p.server.pid)
    max_ns = int(max_s * 1e9)
    done = 0
    gc.disable()
    try:
        for i in range(-warmup, steps):
            if i == 0:
                meter.start()
                start = clock()
            row = frames[i % pool]
            for send, f in zip(sends[:-1], row):
                send(f)
            t0 = clock()
            last_send(row[-1])
            try:
                while b'"ACTION"' not in recv():
                    pass
            except TimeoutError:
                p.aggregator.check()
                raise BenchError(f"{p.aggregator.name}: no action for step {i}") from None
            t1 = clock()
            if i >= 0:
                latencies.append(t1 - t0)
                done += 1
                if t1 - start > max_ns:
                    break
        end = clock()
    finally:
        gc.enable()
    return meter.stop(Run(done, (end - start) / 1e9, done * len(frames[0]), latencies))


def lockstep_frames(plan: Plan) -> list[list[bytes]]:
    out = []
    for step in range(payloads.POOL):
        x = payloads.logits_matrix(plan.models, plan.swergio_actions, seed=step)
        out.append([wire.encode(wire.data("logits", payloads.model_id(m),
                                          **payloads.logits_object(m, x[m])))
                    for m in range(plan.models)])
    return out


def lockstep_section(plan: Plan) -> dict[str, Any]:
    frames = lockstep_frames(plan)
    runs: dict[str, list[Run]] = {k: [] for k in AGGREGATORS}
    for _ in range(plan.repeats):
        for kind in AGGREGATORS:
            with pipeline(kind, plan) as p:
                runs[kind].append(run_lockstep(p, frames, plan.swergio_steps,
                                               plan.swergio_warmup, plan.swergio_max_s))
    s = {k: summarize(v) for k, v in runs.items()}
    row = {"actions": plan.swergio_actions, "frame_bytes": len(frames[0][0]), **s,
           "ratio_worker_seed_steps_per_s": ratio(s["worker"], s["seed"], "steps_per_s"),
           "ratio_worker_echo_steps_per_s": ratio(s["worker"], s["echo"], "steps_per_s"),
           "ratio_worker_seed_p50": ratio(s["worker"], s["seed"], "p50_us")}
    return {"config": {
        "models": plan.models, "actions": plan.swergio_actions, "mode": "lockstep",
        "repeats": plan.repeats, "steps_per_repeat": plan.swergio_steps,
        "max_s_per_repeat": plan.swergio_max_s, "server": "swergio 0.0.2 (PyPI), fresh per run",
        "driver": f"one process, {plan.models + 1} TCP connections: one per model (own NAME "
                  "and COMPONENT_ID) and one for the environment; frames pre-encoded, one "
                  "sendall each, TCP_NODELAY",
        "latency": "last model's write -> action frame read by the environment"},
        "rows": [row]}
