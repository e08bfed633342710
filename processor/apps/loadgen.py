"""Load generator: simulated models and an environment that drive a running worker over ZeroMQ.

`swarm-aggregator loadgen` is the demo's toy world (see `demo.py`) pointed at a worker that
runs elsewhere: a worker process, a container, or a ZeroMQ proxy in front of one. It is
open-loop: every 1/rate seconds each model publishes its logits for the next step, keyed by
`ENV_ID` and `STEP`, whether or not the previous action has come back, so the worker must
run with `window.key = ["ENV_ID", "STEP"]` and a deadline. Optional faults make every panel
of the dashboard move: models that skip a step (partial windows), malformed or duplicate or
late messages (rejections, by reason), and a periodic evolution `GET`.

It is a peer of the client library (`processor.client`) on ZeroMQ: a PUB that connects
to the worker's SUB (or the proxy's XSUB) and a SUB that connects to the worker's PUB (or
the proxy's XPUB); it keeps only actions whose ENV_ID is its own, so several generators can
share one proxy.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from ..client import NoReply, Swarm
from ..config import from_mapping
from .demo import skills_for, toy_logits

PENDING_MAX = 10_000  # steps awaiting their action; older ones count as missed
FAULTY_MODEL = "loadgen-faulty"  # the sender of misshapen logits; never a real model
FAULTS = ("not_json", "missing_field", "duplicate", "bad_logits", "shape", "late")


@dataclass
class LoadStats:
    steps: int = 0            # steps sent
    actions: int = 0          # actions received for our steps
    hits: int = 0             # environments whose action was the hidden target
    decided: int = 0          # environments decided (B per action)
    missed: int = 0           # steps whose action never came (forgotten past PENDING_MAX)
    bad_sent: int = 0         # faulty messages sent on purpose
    latencies: list[float] = field(default_factory=list)  # send to action, seconds
    contribution: dict[str, float] = field(default_factory=dict)  # last GET's answer


class LoadGenerator:
    """M simulated models and an environment; `run()` drives them from the calling thread.

    `silent` may be changed while running (from another thread): those models stop
    sending, as a crashed model would. `stop` ends `handshake()` and `run()`; it is only
    polled, never waited on, so a signal handler may set it.
    """

    def __init__(self, pub: str, sub: str, models: int = 8, actions: int = 6,
                 batch: int = 1, rate: float = 100.0, skip: float = 0.0,
                 bad_rate: float = 0.0, get_every: float = 0.0, env_id: str = "env-0",
                 seed: int = 0, out: TextIO | None = None, report_every: float = 5.0,
                 stop: threading.Event | None = None) -> None:
        cfg = from_mapping({"window": {"key": ["ENV_ID", "STEP"]}})
        self.swarm = Swarm(cfg, endpoints=(pub, sub))
        self.env = self.swarm.environment()
        # Its periodic GETs are fire-and-forget: the replies are read as they come.
        self.replies = self.swarm.subscribe(cfg.topics.evolution)
        self.endpoints = (pub, sub)
        self.models, self.actions, self.batch = models, actions, batch
        self.rate, self.skip, self.bad_rate, self.get_every = rate, skip, bad_rate, get_every
        self.env_id = env_id
        self.rng = np.random.default_rng(seed + 1)
        self.skills = skills_for(models, seed)
        self.names = list(self.skills)
        self.peers = {n: self.swarm.model(n, deterministic=True) for n in self.names}
        self.silent: set[str] = set()
        self.out = out
        self.report_every = report_every
        self.stop = stop if stop is not None else threading.Event()
        self.stats = LoadStats()
        self._pending: OrderedDict[int, tuple[float, np.ndarray]] = OrderedDict()
        self._bad_kind = 0
        self._inject: list[str] = []

    def close(self) -> None:
        self.swarm.close()

    # -- wire ---------------------------------------------------------------------------

    def _drain(self, timeout_s: float = 0.0) -> None:
        """Take every action and reply waiting (waiting up to timeout_s for the first)."""
        actions = self.env.drain(timeout_s)
        now = time.monotonic()
        for obj in actions:
            self._action(obj, now)
        for reply in self.replies.drain():
            if isinstance(reply, dict) and isinstance(reply.get("CONTRIBUTION"), dict):
                self.stats.contribution = reply["CONTRIBUTION"]

    def _action(self, obj: dict[str, Any], now: float) -> None:
        if obj.get("ENV_ID") != self.env_id:
            return
        entry = self._pending.pop(obj.get("STEP"), None)  # type: ignore[arg-type]
        if entry is None:
            return
        sent, target = entry
        s = self.stats
        s.actions += 1
        s.latencies.append(now - sent)
        if len(s.latencies) > 20_000:
            del s.latencies[:10_000]
        got = np.asarray(obj.get("ACTION", []))
        if got.shape == target.shape:
            s.hits += int((got == target).sum())
            s.decided += len(target)

    def handshake(self, timeout_s: float = 30.0) -> bool:
        """PEEK until the worker answers (the slow joiner); 0 waits for ever, `stop` ends it."""
        end = time.monotonic() + timeout_s if timeout_s > 0 else float("inf")
        next_note = time.monotonic() + 5.0
        while time.monotonic() < end and not self.stop.is_set():
            try:
                self.swarm.ready(timeout=min(0.5, max(0.0, end - time.monotonic())))
                return True
            except NoReply:
                pass
            if self.out is not None and time.monotonic() >= next_note:
                next_note = time.monotonic() + 5.0
                self._print(f"loadgen: waiting for a worker (logits to {self.endpoints[0]}, "
                            f"actions from {self.endpoints[1]})")
        return False

    # -- the load -----------------------------------------------------------------------

    def step(self, step: int) -> None:
        """Publish one step's logits from every model that is not silent."""
        a, b = self.actions, self.batch
        skill = np.array([self.skills[n] for n in self.names])
        target = self.rng.integers(a, size=b)
        logits = toy_logits(self.rng, skill, target, a)
        skips = self.rng.random(len(self.names)) < self.skip if self.skip > 0 else None
        silent = self.silent
        inject, self._inject = self._inject, []
        key = (self.env_id, step)
        for i, n in enumerate(self.names):
            if n in silent or (skips is not None and skips[i]):
                continue
            rows = logits[i] if b > 1 else logits[i, 0]
            self.peers[n].send(rows, key)
            # Faults that need an open window go in after its first message.
            for kind in inject:
                if kind == "duplicate":
                    self.peers[n].send(rows, key)
                else:  # shape: one action too many, from a model not in the window
                    wide = np.concatenate([logits[i], np.zeros((b, 1))], axis=1)
                    self.swarm.model(FAULTY_MODEL, deterministic=True).send(
                        wide if b > 1 else wide[0], key)
            inject = []
        self._pending[step] = (time.monotonic(), target)
        if len(self._pending) > PENDING_MAX:
            self._pending.popitem(last=False)
            self.stats.missed += 1
        self.stats.steps += 1

    def bad(self, step: int) -> None:
        """One faulty message, a different kind each time: each has its rejection reason.

        Each goes where it is rejected without disturbing a real window: a duplicate or a
        misshapen message joins the next step's window after its first message; a late one
        repeats a step sent some 10 s ago (closed by then, under any usual deadline).
        """
        kind = FAULTS[self._bad_kind % len(FAULTS)]
        self._bad_kind += 1
        self.stats.bad_sent += 1
        row: Any = [0.0] * self.actions
        if self.batch > 1:
            row = [row] * self.batch
        key = {"ENV_ID": self.env_id, "STEP": step}
        back = int(self.rate * 10) + 1
        if kind == "late" and step < back:
            kind = "not_json"
        logits = self.swarm.topics.logits
        if kind == "not_json":
            self.swarm.publish(logits, b"\x00not json")
        elif kind == "missing_field":
            self.swarm.publish(logits, {"LOGITS": row, **key})
        elif kind == "bad_logits":
            self.swarm.publish(logits, {"LOGITS": [], "COMPONENT_ID": self.names[0], **key})
        elif kind == "late":
            self.peers[self.names[0]].send(row, (self.env_id, step - back))
        else:
            self._inject.append(kind)

    def run(self, duration: float = 0.0, steps: int = 0) -> LoadStats:
        """Send steps at `rate` until `stop`, `duration` seconds or `steps` steps."""
        t0 = time.monotonic()
        period = 1.0 / self.rate if self.rate > 0 else 0.0
        bad_period = 1.0 / self.bad_rate if self.bad_rate > 0 else 0.0
        next_step = next_bad = t0
        next_get = t0 + self.get_every if self.get_every > 0 else float("inf")
        next_report = t0 + self.report_every
        last = (t0, 0, 0)
        step = 0
        while not self.stop.is_set():
            now = time.monotonic()
            if (duration and now - t0 >= duration) or (steps and step >= steps):
                break
            if now >= next_step:
                self.step(step)
                step += 1
                next_step = max(next_step + period, now - 1.0)  # catch up at most 1 s
            if bad_period and now >= next_bad:
                self.bad(step)
                next_bad += bad_period
            if now >= next_get:
                self.swarm.publish(self.swarm.topics.evolution, {"CMD": "GET"})
                next_get += self.get_every
            if self.out is not None and now >= next_report:
                last = self._report(now, last)
                next_report += self.report_every
            wait = min(next_step, next_bad if bad_period else next_step, next_get) - now
            self._drain(max(0.0, min(wait, 0.05)))
        self._drain(0.2)  # the last actions
        return self.stats

    # -- output -------------------------------------------------------------------------

    def _print(self, line: str) -> None:
        assert self.out is not None
        self.out.write(line + "\n")
        self.out.flush()

    def _report(self, now: float, last: tuple[float, int, int]) -> tuple[float, int, int]:
        s = self.stats
        t, steps, actions = last
        dt = max(now - t, 1e-9)
        lat = np.asarray(s.latencies[-2000:]) * 1000 if s.latencies else np.zeros(1)
        p50, p99 = np.percentile(lat, [50, 99])
        reward = s.hits / s.decided if s.decided else 0.0
        line = (f"loadgen {self.env_id}: {(s.steps - steps) / dt:6.0f} steps/s sent  "
                f"{(s.actions - actions) / dt:6.0f} actions/s back  latency p50 {p50:.2f} ms "
                f"p99 {p99:.2f} ms  reward {reward:.2f}  faults sent {s.bad_sent}")
        if s.contribution:
            total = sum(s.contribution.values()) or 1.0
            best = sorted(s.contribution.items(), key=lambda kv: -kv[1])[:3]
            line += "  top: " + ", ".join(f"{m} {c / total:.0%}" for m, c in best)
        self._print(line)
        return now, s.steps, s.actions


def run_loadgen(pub: str, sub: str, models: int = 8, actions: int = 6, batch: int = 1,
                rate: float = 100.0, skip: float = 0.0, bad_rate: float = 0.0,
                get_every: float = 0.0, env_id: str = "env-0", duration: float = 0.0,
                seed: int = 0, wait: float = 0.0, quiet: bool = False,
                out: TextIO = sys.stdout, stop: threading.Event | None = None) -> int:
    """The `loadgen` command: 0 after a clean run, 1 if no worker answered within `wait`.

    Setting `stop` (Ctrl-C or SIGTERM in the command) ends the run cleanly: the last
    actions are collected and the summary printed, exit 0.
    """
    for name, v in (("--models", models), ("--actions", actions), ("--batch", batch)):
        if v < 1:
            print(f"swarm-aggregator loadgen: {name} must be at least 1", file=sys.stderr)
            return 2
    if rate <= 0 or not 0 <= skip < 1 or bad_rate < 0:
        print("swarm-aggregator loadgen: need --rate > 0, 0 <= --skip < 1, --bad-rate >= 0",
              file=sys.stderr)
        return 2
    gen = LoadGenerator(pub, sub, models, actions, batch, rate, skip, bad_rate, get_every,
                        env_id, seed, None if quiet else out, stop=stop)
    try:
        if gen.handshake(wait):
            print(f"loadgen {env_id}: {models} models, {actions} actions, batch {batch}, "
                  f"{rate:g} steps/s, skip {skip:g}, faults {bad_rate:g}/s "
                  f"(logits to {pub}, actions from {sub})", file=out, flush=True)
            gen.run(duration=duration)
        elif not gen.stop.is_set():  # stopped while waiting is not a failure
            print(f"swarm-aggregator loadgen: no worker answered within {wait:g} s "
                  f"(logits to {pub}, actions from {sub})", file=sys.stderr)
            return 1
    finally:
        gen.close()
    s = gen.stats
    print(f"loadgen {env_id}: {s.steps} steps sent, {s.actions} actions back", file=out)
    return 0
