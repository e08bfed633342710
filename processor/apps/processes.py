"""The child processes that the applications, the bench and the tests start: ports on
loopback, a child always stopped, the CPU a child used.

One copy of what every harness needs, so that a child is stopped the same way everywhere:
SIGTERM (or the signal given), a bounded wait, then SIGKILL and a wait that reaps it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def accepts(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """Whether something listens on host:port (a bare connect, closed at once)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10.0
         ) -> bool:
    """Signal a child, wait up to `timeout`, then kill it; True if it stopped by itself."""
    if proc.poll() is not None:
        return True
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


@contextmanager
def child(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
          out: IO[bytes] | int | None = subprocess.DEVNULL, cwd: str | Path | None = None,
          stop_timeout: float = 10.0) -> Iterator[subprocess.Popen[bytes]]:
    """A child process (environment `env` added to this one's, output to `out`) that is
    always stopped when the block ends."""
    proc = subprocess.Popen(list(argv), cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop(proc, timeout=stop_timeout)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
