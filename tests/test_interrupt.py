"""Ctrl-C on a terminal: demo, loadgen and proxy stop in order, report, and exit 0.

A terminal's Ctrl-C sends SIGINT to every process of the foreground process group, at
whatever point each one happens to be. So each command runs here as a terminal would run
it: on a pseudo-terminal (stdout is a tty, as under `make run`), as the leader of its own
process group, which gets SIGINT through killpg. The moment SIGINT lands varies from one
repetition to the next, because the bug this guards against was a race: the demo's sockets
were closed while its simulation thread still used them, and a KeyboardInterrupt could land
anywhere in the main thread.
"""

from __future__ import annotations

import os
import pty
import random
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import zmq

from tests.procs import ROOT, cli, free_port, output, process, worker_env

pytestmark = pytest.mark.timeout(60)

STOP_WAIT = 30.0  # generous: a bound on a hang, not a speed requirement


def command(*args: str) -> list[str]:
    """The installed command, as `make run` uses it; the module where it is not installed."""
    exe = Path(sys.executable).parent / "swarm-aggregator"
    return [str(exe), *args] if exe.exists() else cli(*args)


class Terminal:
    """A command on a pseudo-terminal, leading its own process group."""

    def __init__(self, argv: list[str]) -> None:
        master, slave = pty.openpty()
        try:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=slave, stdout=slave,
                                         stderr=slave, start_new_session=True)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.master: int | None = master
        self.seen = bytearray()

    @property
    def text(self) -> str:
        return self.seen.decode(errors="replace").replace("\r", "")

    def _read(self, timeout: float) -> bool:
        """Take what the command printed within `timeout`; False once its side is closed."""
        if self.master is None:
            return False
        if select.select([self.master], [], [], max(0.0, timeout))[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every copy of the terminal's other side is closed
                chunk = b""
            if not chunk:
                os.close(self.master)
                self.master = None
                return False
            self.seen += chunk
        return True

    def expect(self, pattern: str, timeout: float = STOP_WAIT) -> None:
        """Read until `pattern` shows up; fail if the command exits or time runs out first."""
        end = time.monotonic() + timeout
        while not re.search(pattern, self.text):
            left = end - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.2)):
                raise AssertionError(f"no {pattern!r} within {timeout:g} s; output:\n"
                                     f"{self.text}")

    def pause(self, seconds: float) -> None:
        """Let the command run on (reading, so its output never blocks it)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0 and self._read(left):
            pass

    def interrupt(self) -> None:
        """What Ctrl-C does: SIGINT to the whole process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def finish(self, timeout: float = STOP_WAIT) -> int:
        """Read to the end and return the exit code; fail if it takes longer than timeout."""
        end = time.monotonic() + timeout
        while self._read(max(0.0, min(end - time.monotonic(), 0.2))):
            if time.monotonic() > end:
                raise AssertionError(f"still running {timeout:g} s after SIGINT; output:\n"
                                     f"{self.text}")
        try:
            return self.proc.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not exit {timeout:g} s after SIGINT; output:\n"
                                 f"{self.text}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.master is not None:
            os.close(self.master)
            self.master = None


@contextmanager
def terminal(argv: list[str]) -> Iterator[Terminal]:
    """A Terminal that is always killed, group and all, when the block ends."""
    term = Terminal(argv)
    try:
        yield term
    finally:
        term.close()


def assert_clean(code: int, text: str) -> None:
    assert code == 0, f"exit {code}; output:\n{text}"
    assert "Traceback" not in text, text
    assert "failed" not in text, text


# Where SIGINT lands: delays after the readiness line, spread over the first half second of
# steps (the progress line comes every 0.5 s), plus a random part.
DEMO_DELAYS = [0.0, 0.07, 0.15, 0.23, 0.31, 0.39]


@pytest.mark.parametrize("delay", DEMO_DELAYS)
def test_ctrl_c_on_the_demo_prints_the_leaderboard_and_exits_0(delay):
    with terminal(command("demo", "--steps", "0")) as term:
        term.expect(r"step \d+ +\d+ steps/s")
        term.pause(delay + random.uniform(0.0, 0.05))
        term.interrupt()
        code = term.finish()
    text = term.text
    assert_clean(code, text)
    assert re.search(r"\d+ steps in [\d.]+ s, reward [\d.]+", text), text
    assert "contribution leaderboard" in text, text
    # The ledger was fetched after the steps stopped: every model has its row.
    rows = re.findall(r"^\s+\d+\s+model-\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+%$", text, re.M)
    assert len(rows) == 8, text


@pytest.mark.parametrize("delay", [0.0, 0.2])
def test_ctrl_c_while_the_demo_starts_still_exits_0(delay):
    # The banner comes before the worker starts: SIGINT lands in start-up or handshake.
    with terminal(command("demo", "--steps", "0")) as term:
        term.expect(r"demo: 8 models")
        term.pause(delay)
        term.interrupt()
        code = term.finish()
    text = term.text
    assert_clean(code, text)
    assert re.search(r"\d+ steps in [\d.]+ s", text), text
    assert "contribution leaderboard" in text, text


@pytest.fixture(scope="module")
def worker() -> Iterator[tuple[str, str]]:
    """A worker process for the load generators, keyed by ENV_ID and STEP."""
    sub, pub = free_port(), free_port()
    env = worker_env(transport__zmq__sub=f"tcp://127.0.0.1:{sub}",
                     transport__zmq__pub=f"tcp://127.0.0.1:{pub}",
                     window__models=4, window__key=["ENV_ID", "STEP"],
                     window__timeout_ms=500, metrics__port=0)
    with process(cli("run"), env) as proc:
        yield f"tcp://127.0.0.1:{sub}", f"tcp://127.0.0.1:{pub}"
        assert proc.poll() is None, output(proc)


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3])
def test_ctrl_c_on_loadgen_prints_its_summary_and_exits_0(worker, delay):
    sub, pub = worker
    # An ENV_ID of its own per run: steps of a previous run would be late windows.
    env_id = f"env-{os.getpid()}-{int(delay * 1000)}"
    argv = command("loadgen", "--pub", sub, "--sub", pub, "--models", "4", "--rate", "200",
                   "--env-id", env_id, "--wait", "20")
    with terminal(argv) as term:
        term.expect(rf"loadgen {env_id}: 4 models")  # printed once the worker answered
        term.pause(delay + random.uniform(0.0, 0.05))
        term.interrupt()
        code = term.finish()
    text = term.text
    assert_clean(code, text)
    assert re.search(rf"loadgen {env_id}: \d+ steps sent, \d+ actions back", text), text


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.05, 0.2])
def test_ctrl_c_on_the_proxy_exits_0(delay):
    xsub, xpub = free_port(), free_port()
    argv = command("proxy", "--xsub", f"tcp://127.0.0.1:{xsub}",
                   "--xpub", f"tcp://127.0.0.1:{xpub}")
    with terminal(argv) as term:
        term.expect(r"proxy: publishers connect to")
        if delay:
            forwards(xsub, xpub)  # it really proxies, then SIGINT finds it at work
        term.pause(delay)
        term.interrupt()
        code = term.finish()
    text = term.text
    assert_clean(code, text)
    assert "proxy: stopped" in text, text


def forwards(xsub: int, xpub: int, timeout: float = 20.0) -> None:
    """Publish probes through the proxy until one arrives (no sleep past the slow joiner)."""
    ctx = zmq.Context()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    try:
        pub.connect(f"tcp://127.0.0.1:{xsub}")
        sub.connect(f"tcp://127.0.0.1:{xpub}")
        sub.setsockopt(zmq.SUBSCRIBE, b"probe")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pub.send_multipart([b"probe", b"{}"])
            if sub.poll(100):
                assert sub.recv_multipart() == [b"probe", b"{}"]
                return
        raise AssertionError("nothing came through the proxy")
    finally:
        pub.close(0)
        sub.close(0)
        ctx.term()
