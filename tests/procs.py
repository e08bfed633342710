"""Helpers for tests that start real processes and sockets on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import zmq

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "processor", *args]


@contextmanager
def process(argv: list[str], env: dict[str, str] | None = None,
            stop_timeout: float = 10.0) -> Iterator[subprocess.Popen[bytes]]:
    """A child process that is always stopped (SIGTERM, then SIGKILL) when the block ends.

    Its output goes to a temporary file (a pipe nobody reads could fill and block it);
    `output(proc)` reads it.
    """
    full_env = {**os.environ, **(env or {})}
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_file = log  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def output(proc: subprocess.Popen[bytes]) -> str:
    """Everything the process has printed so far."""
    f = proc.log_file  # type: ignore[attr-defined]
    f.seek(0)
    return str(f.read().decode(errors="replace"))


def worker_env(**keys: object) -> dict[str, str]:
    """SWARM_AGG__* variables from keyword names like window__models=3."""
    out = {}
    for k, v in keys.items():
        value = orjson.dumps(v).decode() if not isinstance(v, str) else v
        out["SWARM_AGG__" + k.upper()] = value
    return out


class ZmqPeer:
    """Models, environment and evolution in one: a PUB towards the worker, a SUB from it."""

    def __init__(self, pub_to: str, sub_from: str) -> None:
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.connect(pub_to)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.connect(sub_from)
        for t in (b"action", b"evolution"):
            self.sub.setsockopt(zmq.SUBSCRIBE, t)

    def close(self) -> None:
        self.pub.close(0)
        self.sub.close(0)
        self.ctx.term()

    def send(self, topic: str, obj: object) -> None:
        body = obj if isinstance(obj, bytes) else orjson.dumps(obj)
        self.pub.send_multipart([topic.encode(), body])

    def recv(self, topic: str, timeout: float = 5.0) -> dict | None:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if self.sub.poll(int(left * 1000) + 1):
                t, body = self.sub.recv_multipart()
                obj = orjson.loads(body)
                if t.decode() == topic and (topic != "evolution" or "CONTRIBUTION" in obj):
                    return obj
        return None

    def handshake(self, timeout: float = 20.0) -> dict:
        """GET until answered: then both directions are connected and subscribed.

        Returns the first reply (it resets the ledger, which is empty at this point).
        """
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.send("evolution", {"CMD": "GET"})
            reply = self.recv("evolution", 0.1)
            if reply is not None:
                return reply
        raise TimeoutError("the worker never answered a GET")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A worker's /metrics as {(sample name, sorted labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(port: int, name: str, **labels: str) -> float:
    return scrape(port).get((name, tuple(sorted(labels.items()))), 0.0)


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
