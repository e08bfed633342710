"""Helpers for tests that start real processes and sockets on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from processor.apps.processes import free_port as free_port  # re-exported for the tests
from processor.apps.processes import stop
from processor.client import Swarm
from processor.config import from_mapping

ROOT = Path(__file__).resolve().parents[1]


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
        stop(proc, timeout=stop_timeout)


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


def zmq_swarm(publish_to: str | int, subscribe_to: str | int, key: Sequence[str] = (),
              ready: bool = True, hwm: int | None = None, **options: Any) -> Swarm:
    """A client swarm (processor.client) that publishes to `publish_to` (the worker's SUB,
    or the proxy's XSUB) and reads `subscribe_to` (the worker's PUB, or the proxy's XPUB);
    a port number means 127.0.0.1. Its environment and evolution are joined and, unless
    `ready=False`, the slow joiner is waited out. `hwm`: both sockets' high-water mark."""
    def addr(p: str | int) -> str:
        return p if isinstance(p, str) else f"tcp://127.0.0.1:{p}"

    zmq_keys = {} if hwm is None else {"sndhwm": hwm, "rcvhwm": hwm}
    cfg = from_mapping({"transport": {"zmq": zmq_keys}, "window": {"key": list(key)}})
    swarm = Swarm(cfg, endpoints=(addr(publish_to), addr(subscribe_to)), **options)
    try:
        swarm.environment()
        swarm.evolution()
        if ready:
            swarm.ready(timeout=30)
    except BaseException:
        swarm.close()
        raise
    return swarm


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


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str | None = None,
             step: float = 0.05) -> Any:
    """Poll `cond` until it gives something truthy, and return that.

    After `timeout` seconds: with `what`, an AssertionError naming it (and the last value);
    without, the last (falsy) value, for the caller to assert on.
    """
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() > end:
            break
        time.sleep(step)
    if not value and what is not None:
        raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what} "
                             f"(last: {value!r})")
    return value
