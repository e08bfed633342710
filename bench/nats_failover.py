"""How long steps stall when a NATS node is lost: a 3-node cluster on loopback, SIGKILL one.

    python -m bench.nats_failover [--victim logits-leader] [--runs 3] [--workers 2]

Starts three clustered nats-servers (JetStream, file storage in a temporary folder, every
stream at 3 replicas) and `--workers` workers as real processes, configured with all three
URLs. The driver (this process, also given all three URLs) runs `--lanes` environments
in closed loop: each sends the logits of its next step (M models, JetStream with PubAck and
Nats-Msg-Id, sent again until stored) and waits for the action on `action.>` before the
next step. After `--before` s it SIGKILLs one node (`--victim`: the leader of the logits
stream, of the action stream, or a node that leads neither stream), keeps driving for
`--down` s, restarts the node, drives `--after` s more, then checks the action stream.

Printed per run, each from the kill (or the restart):
- `flow`: when every lane has had the action of a step it began after the event, i.e.
  when steps flow again everywhere. This is the stall figure.
- `gap`: the longest time without any action arriving, over all lanes.
- `worst`: the slowest step (first logits sent -> action) that was in flight at the event.
- at the end: steps, actions stored (each step exactly once?), and the logits consumers'
  `num_pending` / `num_ack_pending` once drained.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.common import NatsNode, logged_child, wait_meta_leader
from processor.apps.processes import free_port

STREAM, ACTIONS = "SWARM_LOGITS", "SWARM_ACTIONS"


def worker_env(models: int, **keys: Any) -> dict[str, str]:
    base: dict[str, Any] = {"window__models": models, "window__key": ["ENV_ID", "STEP"],
                            "metrics__port": 0, **keys}
    return {"SWARM_AGG__" + k.upper(): v if isinstance(v, str) else json.dumps(v)
            for k, v in base.items()}


class Bodies:
    """Pre-encoded logits messages of one step: M bodies, the step key filled in."""

    def __init__(self, models: int, actions: int, pool: int = 16) -> None:
        rng = np.random.default_rng(0)
        self.rows = [rng.normal(0, 2, (models, actions)).astype(np.float32).tolist()
                     for _ in range(pool)]

    def window(self, env: str, step: int) -> list[bytes]:
        rows = self.rows[step % len(self.rows)]
        return [orjson.dumps({"ENV_ID": env, "STEP": step, "COMPONENT_ID": f"m{m}",
                              "DETERMINISTIC": False, "LOGITS": row})
                for m, row in enumerate(rows)]


@dataclass
class Step:
    lane: int
    began: float
    stored: float = 0.0   # every model's logits stored (PubAck)
    done: float = 0.0     # action received


@dataclass
class Run:
    steps: list[Step] = field(default_factory=list)
    events: dict[str, float] = field(default_factory=dict)
    # JetStream leader elections: (when, "STREAM.<name>" or "CONSUMER.<stream>.<name>")
    elections: list[tuple[float, str]] = field(default_factory=list)
    missed_live: int = 0  # actions not seen on the live feed (read from the stream instead)


class Driver:
    """Models and environments in closed loop, one lane per environment."""

    def __init__(self, urls: list[str], models: int) -> None:
        self.urls = urls
        self.bodies = Bodies(models, 6)
        self.waiting: dict[tuple[str, int], tuple[Step, asyncio.Future[None]]] = {}
        self.run = Run()
        self.stop = False
        self.nc: Any = None
        self.js: Any = None

    async def start(self) -> None:
        import nats

        self.nc = await nats.connect(servers=self.urls, name="bench-driver",
                                     max_reconnect_attempts=-1,
                                     reconnect_time_wait=0.1, connect_timeout=1)
        self.js = self.nc.jetstream(timeout=1.0)
        await self.nc.subscribe("action.>", cb=self._on_action)
        await self.nc.subscribe("$JS.EVENT.ADVISORY.*.LEADER_ELECTED.>", cb=self._on_leader)

    async def _on_leader(self, msg: Any) -> None:
        what = msg.subject.removeprefix("$JS.EVENT.ADVISORY.").replace(".LEADER_ELECTED", "")
        self.run.elections.append((time.monotonic(), what))

    async def _on_action(self, msg: Any) -> None:
        obj = orjson.loads(msg.data)
        entry = self.waiting.pop((obj.get("ENV_ID"), obj.get("STEP")), None)
        if entry is not None:
            entry[0].done = time.monotonic()
            entry[1].set_result(None)

    async def _store(self, env: str, body: bytes, msg_id: str) -> None:
        while True:  # as a model would: until the stream has it (the id makes it once)
            try:
                await self.js.publish(f"logits.{env}", body, headers={"Nats-Msg-Id": msg_id})
                return
            except Exception:
                await asyncio.sleep(0.02)

    async def lane(self, k: int) -> None:
        env = f"e{k}"
        for s in itertools.count():
            if self.stop:
                return
            st = Step(k, time.monotonic())
            self.run.steps.append(st)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiting[(env, s)] = (st, fut)
            await asyncio.gather(*(self._store(env, b, f"m{m}|{env}|{s}")
                                   for m, b in enumerate(self.bodies.window(env, s))))
            st.stored = time.monotonic()
            await self._answered(env, s, st, fut)

    async def _answered(self, env: str, step: int, st: Step, fut: asyncio.Future[None]) -> None:
        """Wait for the action; the live feed is core NATS, so an action republished while
        this process reconnects is missed there: look in the action stream then."""
        end = time.monotonic() + 120
        while time.monotonic() < end:
            try:
                await asyncio.wait_for(asyncio.shield(fut), 1.0)
                return
            except TimeoutError:
                pass
            try:
                last = await self.js.get_last_msg(ACTIONS, f"_swarm.action.{env}")
            except Exception:  # no leader, or not stored yet
                continue
            if orjson.loads(last.data).get("STEP") == step and not fut.done():
                self.waiting.pop((env, step), None)
                # when it was stored, on this process's clock
                st.done = time.monotonic() - (time.time() - last.time.timestamp())
                self.run.missed_live += 1
                return
        raise TimeoutError(f"no action for step {step} of {env}")


def first_after(run: Run, lane: int, at: float) -> Step | None:
    """The first step a lane began at or after `at`."""
    return next((s for s in run.steps if s.lane == lane and s.began >= at), None)


def figures(run: Run, event: str, until: float, partitions: int) -> dict[str, float]:
    """Stall figures after one event, in seconds (see the module's docstring)."""
    from transports.nats import partition_of

    at = run.events[event]
    steps = [s for s in run.steps if s.done]
    lanes = sorted({s.lane for s in steps})
    firsts = {k: first_after(run, k, at) for k in lanes}
    flows = {k: f.done if f and f.done else until for k, f in firsts.items()}
    arrivals = sorted([at] + [s.done for s in steps if at <= s.done <= until] + [until])
    gap = max(b - a for a, b in itertools.pairwise(arrivals))
    worst = max((s.done - s.began for s in steps if s.began <= at <= s.done), default=0.0)
    # What the workers add: each lane's first step from when its logits were stored, or
    # from the last election among the leaders it needs (logits stream, action stream, its
    # partition's consumer) that the event caused, whichever came later.
    elected = {what: t for t, what in run.elections if at <= t <= until}
    after = 0.0
    for k in lanes:
        need = (f"STREAM.{STREAM}", f"STREAM.{ACTIONS}",
                f"CONSUMER.{STREAM}.part-{partition_of(f'e{k}', partitions)}")
        ready = max([at] + [elected[w] for w in need if w in elected])
        first = firsts[k]
        stored = first.stored if first and first.stored else at
        after = max(after, flows[k] - max(ready, stored))
    last = max(elected.values(), default=at) - at
    return {"flow": max(flows.values()) - at, "gap": gap, "worst": worst,
            "elections": len(elected), "last_election": last, "after_election": after}


async def one_run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    import transports.nats as tnats
    from processor.config import from_mapping

    cports = [free_port() for _ in range(3)]
    nodes = [NatsNode(folder, cports, i) for i in range(3)]
    urls = [n.url for n in nodes]
    nats_keys = {"servers": urls, "replicas": 3, "partitions": args.partitions,
                 "ack_wait_s": args.ack_wait, "reconnect_wait_s": 0.25}
    with ExitStack() as stack:
        for n in nodes:
            n.start()
            stack.callback(n.close)
        wait_meta_leader(nodes)
        cfg = from_mapping({"transport": {"kind": "nats", "nats": nats_keys},
                            "window": {"key": ["ENV_ID", "STEP"], "models": args.models}})
        await tnats.setup(cfg)
        for k in range(args.workers):
            env = worker_env(args.models, transport__kind="nats", window__timeout_ms=30000,
                             **{f"transport__nats__{key}": v for key, v in nats_keys.items()},
                             transport__nats__workers=args.workers, transport__nats__index=k,
                             transport__nats__worker_id=f"w{k}", log__level=args.log_level)
            stack.enter_context(logged_child([sys.executable, "-m", "processor", "run"], env,
                                      folder / f"worker{k}.log"))
        driver = Driver(urls, args.models)
        await driver.start()
        try:
            _, missing = await tnats.gather(cfg, "PEEK", timeout=60)
            if missing:
                raise SystemExit(f"no worker serves partitions {missing}")
            lanes = [asyncio.create_task(driver.lane(k)) for k in range(args.lanes)]
            await asyncio.sleep(args.before)
            leaders = {s: (await driver.js.stream_info(s)).cluster.leader
                       for s in (STREAM, ACTIONS)}
            if args.victim == "logits-leader":
                victim = next(n for n in nodes if n.name == leaders[STREAM])
            elif args.victim == "action-leader":
                victim = next(n for n in nodes if n.name == leaders[ACTIONS])
            elif args.victim == "worker-node":
                victim = next(n for n in nodes if n.serves("swarm-aggregator w0"))
            else:  # leads neither stream; better still, no client is connected to it
                calm = [n for n in nodes if n.name not in leaders.values()] or nodes
                names = ["bench-driver"] + [f"swarm-aggregator w{k}" for k in range(args.workers)]
                victim = next((n for n in calm if not any(map(n.serves, names))), calm[0])
            served = [f"w{k}" for k in range(args.workers)
                      if victim.serves(f"swarm-aggregator w{k}")]
            driver.run.events["kill"] = time.monotonic()
            victim.kill()
            await asyncio.sleep(args.down)
            driver.run.events["restart"] = time.monotonic()
            victim.start()
            await asyncio.sleep(args.after)
            driver.stop = True
            await asyncio.wait_for(asyncio.gather(*lanes), 120)
            end = driver.run.events["restart"]
            out: dict[str, Any] = {
                "victim": victim.name, "leaders": leaders, "served": served,
                "kill": figures(driver.run, "kill", end, args.partitions),
                "restart": figures(driver.run, "restart", time.monotonic(), args.partitions)}
            out["steps"] = len(driver.run.steps)
            out["missed_live"] = driver.run.missed_live
            if args.verbose:
                slow(driver.run, args.partitions)
            keys = await stored_keys(driver.js)
            out["actions"] = len(keys)
            out["twice"] = len(keys) - len(set(keys))
            out["unsettled"] = await unsettled(driver.js, time.monotonic() + 3 * args.ack_wait)
            return out
        finally:
            await driver.nc.close()


def slow(run: Run, partitions: int) -> None:
    """Each lane's slowest step around the kill: when it began, was stored, was answered."""
    from transports.nats import partition_of

    at = run.events["kill"]
    print("    elections: " + ", ".join(f"{w} {t - at:+.2f} s" for t, w in run.elections
                                         if t >= at), flush=True)
    for k in sorted({s.lane for s in run.steps}):
        near = [s for s in run.steps if s.lane == k and s.done and s.done >= at - 1
                and s.began <= at + 15]
        if not near:
            continue
        s = max(near, key=lambda s: s.done - s.began)
        print(f"    lane e{k:<3d} partition {partition_of(f'e{k}', partitions)}: slowest step "
              f"began {s.began - at:+6.2f} s, stored {s.stored - at:+6.2f} s, "
              f"answered {s.done - at:+6.2f} s", flush=True)


async def stored_keys(js: Any) -> list[tuple[str, int]]:
    total = (await js.stream_info(ACTIONS)).state.messages
    sub = await js.subscribe(">", stream=ACTIONS, ordered_consumer=True)
    keys: list[tuple[str, int]] = []
    try:
        while len(keys) < total:
            obj = orjson.loads((await sub.next_msg(timeout=10)).data)
            keys.append((obj["ENV_ID"], obj["STEP"]))
    finally:
        await sub.unsubscribe()
    return keys


async def unsettled(js: Any, until: float) -> int:
    """Logits pending or unacknowledged over all partitions, once 0 or at `until`."""
    while True:
        infos = await js.consumers_info(STREAM)
        left = sum(c.num_pending + c.num_ack_pending for c in infos)
        if not left or time.monotonic() > until:
            return int(left)
        await asyncio.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nats_failover", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--victim", default="logits-leader",
                   choices=("logits-leader", "action-leader", "other", "worker-node"),
                   help="the node killed: the logits stream's leader, the action stream's, "
                   "one that leads neither stream, or the one worker w0 is connected to")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--lanes", type=int, default=16, help="environments in closed loop")
    p.add_argument("--ack-wait", type=float, default=10.0, help="transport.nats.ack_wait_s")
    p.add_argument("--before", type=float, default=4.0, help="s of driving before the kill")
    p.add_argument("--down", type=float, default=12.0, help="s the node stays down")
    p.add_argument("--after", type=float, default=8.0, help="s of driving after the restart")
    p.add_argument("--keep", action="store_true", help="keep the logs folder")
    p.add_argument("--log-level", default="INFO", help="the workers' log level")
    p.add_argument("--verbose", action="store_true", help="each lane's slowest step")
    args = p.parse_args(argv)
    print(f"NATS failover: 3 nodes, R=3, {args.workers} workers, P={args.partitions}, "
          f"M={args.models}, {args.lanes} lanes, victim={args.victim}, "
          f"ack_wait_s={args.ack_wait}", flush=True)
    flows, afters = [], []
    for r in range(args.runs):
        folder = Path(tempfile.mkdtemp(prefix="nats-failover-"))
        res = asyncio.run(one_run(args, folder))
        k, s = res["kill"], res["restart"]
        flows.append(k["flow"])
        afters.append(k["after_election"])
        ok = res["actions"] == res["steps"] and not res["twice"] and not res["unsettled"]
        print(f"run {r + 1}: killed {res['victim']} (logits leader {res['leaders'][STREAM]}, "
              f"actions leader {res['leaders'][ACTIONS]}; workers connected to it: "
              f"{', '.join(res['served']) or 'none'})\n"
              f"  after the kill:    flow {k['flow']:5.2f} s  gap {k['gap']:5.2f} s  "
              f"worst step {k['worst']:5.2f} s  ({k['elections']} leaders elected, the last "
              f"at {k['last_election']:4.2f} s; flow after the elections needed "
              f"{k['after_election']:4.2f} s)\n"
              f"  after the restart: flow {s['flow']:5.2f} s  gap {s['gap']:5.2f} s  "
              f"worst step {s['worst']:5.2f} s\n"
              f"  steps {res['steps']}, actions stored {res['actions']}, twice {res['twice']},"
              f" unsettled logits {res['unsettled']}: {'ok' if ok else 'NOT OK'}"
              f" ({res['missed_live']} actions missed live, read from the stream)"
              + ("" if not args.keep else f"\n  logs: {folder}"), flush=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"flow after the kill: median {statistics.median(flows):.2f} s, "
          f"max {max(flows):.2f} s; after the elections a lane needed: median "
          f"{statistics.median(afters):.2f} s, max {max(afters):.2f} s ({len(flows)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
