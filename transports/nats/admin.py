"""Operators' helpers: `swarm-aggregator nats setup | get | peek | status | drive`.

`setup` creates the streams and consumers, `get` / `peek` send an evolution command to
every worker and merge their shares, `status` shows the streams and consumers, `drive`
is a small load generator of models and environments over NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from typing import Any

import nats
import orjson
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from processor.config import Config
from processor.errors import ConfigError
from processor.ledger import merge_replies

from .connection import connect_admin
from .topology import (
    consumer_name,
    ensure_consumers,
    ensure_streams,
    stream_configs,
)

log = logging.getLogger("swarm_aggregator.nats")

async def setup(cfg: Config) -> list[str]:
    """Create the streams and every partition's consumer; returns what now exists."""
    nc = await connect_admin(cfg)
    try:
        js = nc.jetstream()
        await ensure_streams(js, cfg)
        await ensure_consumers(js, cfg, list(range(cfg.transport.nats.partitions)))
        return [sc.name or "" for sc in stream_configs(cfg)]
    finally:
        await nc.close()


async def gather(cfg: Config, command: str = "GET", timeout: float = 5.0,
                 request_id: str | None = None) -> tuple[dict[str, Any], list[int]]:
    """Send an evolution command to every worker and merge their shares.

    Returns the merged reply and the partitions no reply covered. GET is sent again with the
    same REQUEST_ID until every partition is covered (a worker answers a repeated id with
    the same report, without a second reset), so a lost reply costs no share.
    """
    import uuid

    n, topic = cfg.transport.nats, cfg.topics.evolution
    rid = request_id or uuid.uuid4().hex
    replies: dict[str, dict[str, Any]] = {}
    arrived = asyncio.Event()

    async def on_reply(msg: Msg) -> None:
        try:
            obj = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        if isinstance(obj, dict) and obj.get("REQUEST_ID") == rid and "WORKER" in obj:
            replies[str(obj["WORKER"])] = obj
            arrived.set()

    def missing() -> list[int]:
        covered = {p for r in replies.values() for p in r.get("PARTITIONS", ())}
        return [p for p in range(n.partitions) if p not in covered]

    nc = await connect_admin(cfg)
    try:
        await nc.subscribe(topic, cb=on_reply)
        end = time.monotonic() + timeout
        while missing() and time.monotonic() < end:
            await nc.publish(topic, orjson.dumps({"CMD": command, "REQUEST_ID": rid}))
            resend = time.monotonic() + 0.5
            while missing() and (left := min(resend, end) - time.monotonic()) > 0:
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), left)
    finally:
        await nc.close()
    merged = merge_replies(list(replies.values()))
    merged["REQUEST_ID"] = rid
    return merged, missing()


async def status(cfg: Config) -> dict[str, Any]:
    """Streams' message counts and each partition consumer's backlog."""
    n = cfg.transport.nats
    nc = await connect_admin(cfg)
    try:
        js = nc.jetstream()
        out: dict[str, Any] = {"streams": {}, "partitions": {}}
        for sc in stream_configs(cfg):
            try:
                info = await js.stream_info(sc.name or "")
                out["streams"][sc.name] = info.state.messages
            except NotFoundError:
                out["streams"][sc.name] = None
        for p in range(n.partitions):
            try:
                ci = await js.consumer_info(n.stream, consumer_name(p))
                out["partitions"][p] = {"pending": ci.num_pending,
                                        "ack_pending": ci.num_ack_pending,
                                        "redelivered": ci.num_redelivered,
                                        "pulls_waiting": ci.num_waiting}
            except NotFoundError:
                out["partitions"][p] = None
        return out
    finally:
        await nc.close()


async def drive(cfg: Config, models: int = 8, actions: int = 6, envs: int = 16,
                rate: float = 10.0, steps: int = 0) -> tuple[int, int]:
    """Simulated models and environments: every 1/rate s, each environment's next step.

    Publishes on logits.<env> with JetStream (PubAck) and reads the live actions; prints a
    line a second. Environment ids carry a random run id, so a restarted driver never
    reuses a step key. Returns (steps sent, actions received); runs `steps` steps (0: for
    ever).
    """
    import uuid

    import numpy as np

    t = cfg.topics
    run = uuid.uuid4().hex[:6]
    names = [f"{run}-{e}" for e in range(envs)]
    sent_at: dict[tuple[str, int], float] = {}
    lat: list[float] = []
    got = 0

    async def on_action(msg: Msg) -> None:
        nonlocal got
        obj = orjson.loads(msg.data)
        at = sent_at.pop((obj.get("ENV_ID"), obj.get("STEP")), None)
        if at is not None:
            got += 1
            lat.append(time.monotonic() - at)

    rng = np.random.default_rng()
    nc = await connect_admin(cfg)
    try:
        js = nc.jetstream()
        await nc.subscribe(f"{t.action}.>", cb=on_action)
        while True:  # the workers (or `setup`) create the stream
            try:
                await js.stream_info(cfg.transport.nats.stream)
                break
            except NotFoundError:
                print("waiting for the logits stream", flush=True)
                await asyncio.sleep(1.0)
        step, last = 0, time.monotonic()
        while not steps or step < steps:
            tick = time.monotonic()
            x = rng.normal(0, 2, (envs, models, actions)).astype(np.float32).tolist()
            futures = []
            for e, env in enumerate(names):
                sent_at[(env, step)] = tick
                for m in range(models):
                    body = orjson.dumps({"ENV_ID": env, "STEP": step, "COMPONENT_ID": f"m{m}",
                                         "DETERMINISTIC": False, "LOGITS": x[e][m]})
                    futures.append(await js.publish_async(f"{t.logits}.{env}", body))
            await asyncio.gather(*futures)
            step += 1
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                p50 = sorted(lat)[len(lat) // 2] * 1000 if lat else float("nan")
                print(f"steps {step * envs}  actions {got}  waiting {len(sent_at)}  "
                      f"latency p50 {p50:.1f} ms", flush=True)
                lat.clear()
            await asyncio.sleep(max(0.0, 1 / rate - (time.monotonic() - tick)))
        end = time.monotonic() + 10
        while sent_at and time.monotonic() < end:
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    return step * envs, got


def main(argv: list[str] | None = None) -> int:
    import argparse

    from processor.config import load

    parser = argparse.ArgumentParser(
        prog="swarm-aggregator nats",
        description="NATS helpers of swarm-aggregator. Config as for `swarm-aggregator run`: "
                    "-c FILE and SWARM_AGG__* variables.")
    parser.add_argument("command", choices=("setup", "get", "peek", "status", "drive"),
                        help="setup: create streams and all consumers; get/peek: ask every "
                        "worker for its share and print the sum; status: backlogs; drive: "
                        "simulated models and environments")
    parser.add_argument("-c", "--config", help="TOML config file")
    parser.add_argument("--servers", help="comma-separated NATS URLs (overrides the config)")
    parser.add_argument("--timeout", type=float, default=5.0, help="get/peek: seconds")
    parser.add_argument("--models", type=int, default=8, help="drive: models (M)")
    parser.add_argument("--actions", type=int, default=6, help="drive: actions (A)")
    parser.add_argument("--envs", type=int, default=16, help="drive: environments")
    parser.add_argument("--rate", type=float, default=10.0, help="drive: steps/s per env")
    parser.add_argument("--steps", type=int, default=0, help="drive: steps per env (0: ever)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.servers:
        overrides["transport"] = {"nats": {"servers": args.servers.split(",")}}
    try:
        cfg = load(args.config, overrides=overrides)
    except ConfigError as e:
        print(f"bad config: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "setup":
            names = asyncio.run(setup(cfg))
            print(f"ok: streams {', '.join(names)}; consumers part-0..part-"
                  f"{cfg.transport.nats.partitions - 1}")
        elif args.command in ("get", "peek"):
            merged, missing = asyncio.run(gather(cfg, args.command.upper(), args.timeout))
            print(json.dumps(merged, indent=1, sort_keys=True))
            if missing:
                print(f"no worker answered for partitions {missing}", file=sys.stderr)
                return 1
        elif args.command == "status":
            print(json.dumps(asyncio.run(status(cfg)), indent=1))
        else:
            sent, got = asyncio.run(drive(cfg, args.models, args.actions, args.envs, args.rate,
                                          args.steps))
            print(f"done: {sent} steps, {got} actions")
            return 0 if got == sent else 1
    except (OSError, TimeoutError, nats.errors.Error) as e:
        print(f"cannot reach NATS: {e!r}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
