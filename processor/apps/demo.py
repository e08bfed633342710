"""The embedded demo: the worker, M simulated models and a toy environment on loopback.

The environment has B parallel environments; at each step each one hides a target action
and pays reward 1 when the swarm's action hits it. Model i knows the target with
probability skill_i and otherwise favours a random action, so its logits are informative
in proportion to its skill. Everything runs over real ZeroMQ sockets on 127.0.0.1: the
worker in this process's event loop, models and environment in a thread, as peers of the
client library (`processor.client`). At the end the
evolution request (`CMD: GET`) fetches the contribution ledger, printed as a leaderboard:
the skilled models should rank first.

The models send `DETERMINISTIC: true` (evaluation, argmax). Under sampling the credit
p_m[a] / P[a] has expectation 1/M for every model whatever its skill (a ~ P / M), so only
the argmax mode can tell skill apart in a short run.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from ..client import Environment, Model, NoReply, Swarm
from ..config import Config


@dataclass
class DemoResult:
    steps: int = 0
    reward: float = 0.0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    contribution: dict[str, float] = field(default_factory=dict)
    skills: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def model_names(models: int) -> list[str]:
    return [f"model-{i:02d}" for i in range(models)]


def skills_for(models: int, seed: int) -> dict[str, float]:
    """Skills spread evenly from 0.9 down to 0.05, assigned to names in a shuffled order."""
    rng = np.random.default_rng(seed)
    levels = np.linspace(0.9, 0.05, models) if models > 1 else np.array([0.9])
    order = rng.permutation(models)
    names = model_names(models)
    return {names[j]: float(levels[k]) for k, j in enumerate(order)}


def toy_logits(rng: np.random.Generator, skill: np.ndarray, target: np.ndarray,
               actions: int) -> np.ndarray:
    """Logits (M, B, A) of models that know each target with probability skill_m.

    A model that knows favours the target, one that does not favours a random action:
    the favoured action's logit is 3 on a background of standard normal noise.
    """
    m, b = len(skill), len(target)
    knows = rng.random((m, b)) < skill[:, None]
    favoured = np.where(knows, target[None, :], rng.integers(actions, size=(m, b)))
    logits = rng.normal(0.0, 1.0, (m, b, actions))
    np.put_along_axis(logits, favoured[:, :, None], 3.0, axis=2)
    return logits


class Simulation:
    """Models and environment, driven from one thread through the client library.

    `run()` opens, uses and closes its swarm (a ZeroMQ PUB and SUB) in the calling thread:
    ZeroMQ sockets are not thread-safe, and closing them from another thread while this one
    still polls them is what made Ctrl-C end in "Socket operation on non-socket" or hang.
    `stop` ends the steps; `run()` then still fetches the leaderboard (the worker must keep
    serving until `run()` returns) and closes its swarm before returning.
    """

    def __init__(self, models: int, actions: int, batch: int, steps: int, seed: int,
                 out: TextIO | None, stop: threading.Event | None = None) -> None:
        self.models, self.actions, self.batch, self.steps = models, actions, batch, steps
        self.rng = np.random.default_rng(seed + 1)
        self.skills = skills_for(models, seed)
        self.out = out
        # Only polled with is_set() here, never waited on: a signal handler may set it.
        self.stop = stop if stop is not None else threading.Event()
        self.result = DemoResult(skills=self.skills)

    def ready(self, swarm: Swarm, timeout_s: float = 10.0) -> bool:
        """PEEK until the worker answers (the slow joiner), or until `stop`."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and not self.stop.is_set():
            try:
                swarm.ready(timeout=0.5)
                return True
            except NoReply:
                continue
        return False

    def run(self, cfg: Config) -> DemoResult:
        """Handshake, steps until `steps` or `stop`, then the final GET; errors go in result.

        `cfg`: the worker's config, with the addresses its sockets are bound to."""
        res = self.result
        try:
            with Swarm(cfg) as swarm:
                env, evo = swarm.environment(), swarm.evolution()
                models = [swarm.model(n, deterministic=True) for n in self.skills]
                if not self.ready(swarm):
                    if not self.stop.is_set():  # stopped before the first step: no failure
                        res.error = "the worker did not answer on loopback"
                    return res
                self._loop(res, models, env)
                try:
                    res.contribution = evo.get(timeout=4.0)["CONTRIBUTION"]
                except NoReply:
                    pass
        except Exception as e:  # noqa: BLE001 - reported to the user, then the demo stops
            res.error = f"{type(e).__name__}: {e}"
        return res

    def _loop(self, res: DemoResult, models: list[Model], env: Environment) -> None:
        skill = np.array([self.skills[m.id] for m in models])
        a, b = self.actions, self.batch
        hits = 0
        t0 = last_print = time.monotonic()
        step = 0
        while not self.stop.is_set() and (self.steps == 0 or step < self.steps):
            target = self.rng.integers(a, size=b)
            logits = toy_logits(self.rng, skill, target, a)
            for i, model in enumerate(models):
                model.send(logits[i] if b > 1 else logits[i, 0], step)
            sent = time.monotonic()
            try:
                reply = env.wait(step, timeout=5.0)
            except NoReply:
                res.error = f"no action for step {step} within 5 s"
                return
            res.latencies.append(time.monotonic() - sent)
            hits += int((np.asarray(reply["ACTION"]) == target).sum())
            step += 1
            now = time.monotonic()
            if self.out is not None and now - last_print >= 0.5:
                last_print = now
                self._progress(step, now - t0, hits / (step * b), res.latencies)
        res.steps = step
        res.seconds = time.monotonic() - t0
        res.reward = hits / max(1, step * b)
        if self.out is not None and step:
            self._progress(step, res.seconds, res.reward, res.latencies, final=True)

    def _progress(self, step: int, secs: float, reward: float, lat: list[float],
                  final: bool = False) -> None:
        recent = np.asarray(lat[-2000:]) * 1000
        p50, p99 = np.percentile(recent, [50, 99])
        total = f"/{self.steps}" if self.steps else ""
        line = (f"step {step}{total}  {step / secs:7.0f} steps/s  latency p50 {p50:.2f} ms "
                f"p99 {p99:.2f} ms  reward {reward:.2f}")
        assert self.out is not None
        if self.out.isatty():
            self.out.write("\r" + line + ("\n" if final else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()


def leaderboard(res: DemoResult) -> str:
    total = sum(res.contribution.values()) or 1.0
    rows = sorted(res.contribution.items(), key=lambda kv: -kv[1])
    lines = ["rank  model      skill  contribution  share"]
    for i, (name, c) in enumerate(rows, 1):
        lines.append(f"{i:>4}  {name:<9}  {res.skills.get(name, float('nan')):5.2f}  "
                     f"{c:12.2f}  {c / total:5.1%}")
    return "\n".join(lines)


async def _serve(sim: Simulation, models: int) -> DemoResult:
    # Imported here: loadgen and study use this module's toy world only, and the worker
    # brings torch, seconds of start-up a load generator does not need.
    from transports.zeromq import ZmqTransport

    from ..config import from_mapping, replace
    from ..worker import Worker

    cfg = from_mapping({
        "transport": {"kind": "zmq", "zmq": {"sub": "tcp://127.0.0.1:0",
                                             "pub": "tcp://127.0.0.1:0"}},
        "window": {"models": models, "key": ["STEP"], "timeout_ms": 2000},
        "metrics": {"port": 0},
    })
    transport = ZmqTransport(cfg, lambda reason, detail: None)
    worker = Worker(cfg, transport)
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(worker.run(stop, started))
    # A worker that fails to start never sets `started`: its error must not become a hang.
    waiting = asyncio.create_task(started.wait())
    await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
    if not started.is_set():
        waiting.cancel()
        await task  # raises the worker's error
        raise RuntimeError("the worker stopped before it started")
    loop = asyncio.get_running_loop()
    # The peers' config is the worker's, with the ports its sockets were bound to.
    peers = replace(cfg, transport={"zmq": {"sub": transport.sub_endpoint,
                                            "pub": transport.pub_endpoint}})
    simulation = loop.run_in_executor(None, sim.run, peers)
    try:
        # Shielded: a cancelled wait must not abandon a thread that still uses its sockets.
        return await asyncio.shield(simulation)
    finally:
        # Order matters: the simulation first (its last GET needs the worker), the worker
        # second. When not cancelled, the simulation is already done here.
        if not simulation.done():
            sim.stop.set()
            await asyncio.wait([simulation])
        stop.set()
        await task


def run_demo(models: int = 8, actions: int = 6, steps: int = 0, batch: int = 1, seed: int = 0,
             quiet: bool = False, out: TextIO = sys.stdout,
             stop: threading.Event | None = None) -> int:
    """The `demo` command; setting `stop` (Ctrl-C in the command) ends it with the leaderboard."""
    for name, v in (("--models", models), ("--actions", actions), ("--batch", batch)):
        if v < 1:
            print(f"swarm-aggregator demo: {name} must be at least 1", file=sys.stderr)
            return 2
    if steps < 0:
        print("swarm-aggregator demo: --steps must be >= 0", file=sys.stderr)
        return 2
    print(f"demo: {models} models, {actions} actions, batch {batch}, "
          f"{steps or 'unlimited'} steps over ZeroMQ on 127.0.0.1 (Ctrl-C stops)", file=out)
    sim = Simulation(models, actions, batch, steps, seed, None if quiet else out, stop)
    res = asyncio.run(_serve(sim, models))
    if res.error:
        print(f"demo failed: {res.error}", file=sys.stderr)
        return 1
    print(f"\n{res.steps} steps in {res.seconds:.1f} s, reward {res.reward:.3f}\n"
          f"contribution leaderboard (the evolution component's GET):", file=out)
    print(leaderboard(res), file=out)
    return 0
