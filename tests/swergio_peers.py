"""Real swergio 0.0.2 components for the swergio tests: the PyPI server in a child process,
the worker (as a child process or in a thread of the test), and peers that are real
`swergio.Client`s written the way the RLGym example writes its components.

Every helper is a context manager or has a `close()`, so a test stops all it started even
when it fails. Waits poll a condition until a deadline; none sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from prometheus_client import CollectorRegistry
from swergio import MESSAGE_TYPE, Client, Trigger

from processor.apps.processes import accepts, stop
from processor.config import Config
from processor.metrics import Metrics
from processor.worker import Worker
from tests.procs import ROOT, wait_for
from transports import create

HOST = "127.0.0.1"
FORMAT = "utf-8"
HEADER_LENGTH = 10
WORKER_NAME = "aggregation"

# The PyPI server, unchanged. It prints a line per message: its stdout goes to /dev/null.
SERVER_CODE = (
    "import sys\n"
    "from swergio import Server\n"
    "Server(sys.argv[1], int(sys.argv[2]), 'utf-8', 10).start()\n"
)


_stop = stop  # (the name its users know)


# -- the swergio server --------------------------------------------------------------------


def _server_listening(port: int) -> bool:
    """A bare connect. (The PyPI server's thread for it ends on a KeyError, as it does for
    any client that leaves unregistered, and prints a traceback to its stderr; nothing
    else happens. A probe that registers would be worse: the server sends the REGISTER
    and JOINROOM of later clients to everyone in `_command`, and a send to a client that
    has just closed raises in the *sender's* thread, which drops the sender.)"""
    return accepts(port, HOST)


@contextmanager
def swergio_server(port: int, timeout: float = 15.0) -> Iterator[subprocess.Popen[bytes]]:
    """The real swergio Server on 127.0.0.1:`port`, listening when the block starts and
    killed when it ends."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", SERVER_CODE, HOST, str(port)],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        try:
            def up() -> bool:
                if proc.poll() is not None:
                    err.seek(0)
                    raise AssertionError(f"swergio server exited {proc.returncode}: "
                                         f"{err.read().decode(errors='replace')[-2000:]}")
                return _server_listening(port)
            wait_for(up, timeout, f"the swergio server on port {port}", step=0.02)
            yield proc
        finally:
            _stop(proc, signal.SIGKILL)


# -- the worker as a process ---------------------------------------------------------------


def worker_toml(port: int, models: int, metrics_port: int = 0, extra: str = "") -> str:
    return f"""
[transport]
kind = "swergio"
[transport.swergio]
host = "{HOST}"
port = {port}
name = "{WORKER_NAME}"
header_length = {HEADER_LENGTH}
[window]
models = {models}
key = []
timeout_ms = 0
[metrics]
port = {metrics_port}
{extra}
"""


@contextmanager
def worker_process(toml: str) -> Iterator[subprocess.Popen[bytes]]:
    """`swarm-aggregator run -c FILE` in a child process; SIGTERM (then SIGKILL) at the
    end. Its log goes to a temporary file: `process_output(proc)` reads it."""
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile() as log:
        cfg = Path(tmp) / "worker.toml"
        cfg.write_text(toml)
        proc = subprocess.Popen([sys.executable, "-m", "processor", "run", "-c", str(cfg)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        proc.log_file = log  # type: ignore[attr-defined]
        try:
            yield proc
        finally:
            _stop(proc)


def process_output(proc: subprocess.Popen[bytes]) -> str:
    f = proc.log_file  # type: ignore[attr-defined]
    f.seek(0)
    return str(f.read().decode(errors="replace"))


# -- the worker in a thread of the test ----------------------------------------------------


class WorkerThread:
    """The worker in-process (its own event loop in a thread), so a test reads its metrics."""

    def __init__(self, cfg: Config) -> None:
        self.metrics = Metrics(CollectorRegistry())
        self.transport = create(cfg, on_reject=self._on_reject)
        self.worker = Worker(cfg, self.transport, self.metrics)
        self.error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="worker", daemon=True)

    def _on_reject(self, reason: str, detail: str) -> None:
        self.worker.reject(reason, detail)

    def _main(self) -> None:
        async def run() -> None:
            self._stop = asyncio.Event()
            await self.worker.run(self._stop)
        try:
            self._loop.run_until_complete(run())
        except BaseException as e:  # noqa: BLE001 - reported by `alive` and __exit__
            self.error = e
        finally:
            self._loop.close()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            wait_for(lambda: self._stop is not None, 5, "the worker's loop")
            self._loop.call_soon_threadsafe(self._stop.set)  # type: ignore[union-attr]
            self._thread.join(10)
        assert not self._thread.is_alive(), "the worker did not stop within 10 s"
        if self.error is not None and exc == (None, None, None):
            raise AssertionError(f"the worker failed: {self.error!r}") from self.error

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def rejected(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value(
            "swarm_aggregator_messages_rejected_total", {"reason": reason}) or 0.0


# -- swergio peers -------------------------------------------------------------------------


class Peer:
    """A real swergio Client whose `listen()` loop runs in a daemon thread.

    The PyPI client sends header and body in two writes; with Nagle's algorithm on, the
    body waits for the ACK of the header, which the receiver delays (~40 ms on Linux). Set
    TCP_NODELAY on the peers' sockets so a test of hundreds of steps stays fast; it changes
    nothing on the wire but the timing.
    """

    def __init__(self, name: str, port: int, nodelay: bool = True, **kwargs: Any) -> None:
        self.name = name
        self.client = Client(name, HOST, port, FORMAT, HEADER_LENGTH, **kwargs)
        if nodelay:
            self.client.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._listen, name=f"peer-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def _listen(self) -> None:
        try:
            self.client.listen()
        except OSError:
            pass  # listen() ends by sending DISCONNECT on a socket that is already gone
        except BaseException as e:  # noqa: BLE001 - a handler's failure, shown by check()
            self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"peer {self.name} failed: {self.error!r}") from self.error

    def send(self, msg: dict[str, Any]) -> None:
        """Send from the test's thread; only for peers whose handlers never reply, so the
        two threads never write at once."""
        self.client.send(msg)

    def close(self) -> None:
        try:
            self.client.client.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5)
        self.client.client.close()


def data(room: str, **fields: Any) -> dict[str, Any]:
    """A swergio data message, as a component writes one by hand."""
    return {"ID": uuid.uuid4().hex, "TYPE": MESSAGE_TYPE.DATA.CUSTOM.id, "TO_ROOM": room,
            **fields}


class Evolution(Peer):
    """The evolution component: sends {"CMD": "GET"} in room evolution and collects the
    replies. It is also the test's watcher: every swergio client is in room `_command`,
    where the server forwards everyone's REGISTER and JOINROOM, so it sees when the worker
    and the other peers have joined their rooms."""

    def __init__(self, port: int, name: str = "evolution") -> None:
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.joined: set[tuple[str, str]] = set()
        self.probes: list[Peer] = []
        super().__init__(name, port, replies=self.replies, joined=self.joined)

        def on_evolution(msg: dict[str, Any], replies: queue.Queue[dict[str, Any]]) -> None:
            if "CONTRIBUTION" in msg:
                replies.put(msg)

        def on_join(msg: dict[str, Any], joined: set[tuple[str, str]]) -> None:
            joined.add((str(msg.get("SENT_BY")), str(msg.get("ROOM"))))

        c = self.client
        c.add_eventHandler(on_evolution, MESSAGE_TYPE.DATA.CUSTOM,
                           trigger=Trigger(MESSAGE_TYPE.DATA.CUSTOM, "evolution"))
        c.add_eventHandler(on_join, None,
                           trigger=Trigger(MESSAGE_TYPE.COMMAND.JOINROOM, "_command"))

    def sync(self, port: int, timeout: float = 10.0) -> Self:
        """Return once this watcher is in room `_command` on the server, so it sees the
        joins of every client that connects after. Its own joins are not forwarded to it:
        other clients join until it sees one. They stay connected (and read) until the
        watcher closes: a client that leaves while others join can make the server drop
        one of those (see `_server_listening`)."""
        end = time.monotonic() + timeout
        while True:
            probe = Peer(f"sync-{uuid.uuid4().hex[:8]}", port).start()
            self.probes.append(probe)
            pair = (probe.name, "_command")
            try:
                wait_for(lambda: pair in self.joined, 0.5, "the probe")  # noqa: B023
                return self
            except AssertionError:
                self.check()
                if time.monotonic() > end:
                    raise AssertionError(f"the watcher saw no join within {timeout}s"
                                         ) from None

    def close(self) -> None:
        super().close()
        for p in self.probes:
            p.close()

    def handshake(self, timeout: float = 20.0) -> dict[str, Any]:
        """GET until the worker answers: it is then in its rooms. Each attempt carries its
        own ROOT_ID (swergio components copy it into their reply), and only the reply to
        the latest attempt ends the wait, so no earlier GET is still on its way to reset
        the ledger later. Returns that reply."""
        end = time.monotonic() + timeout
        n = 0
        while time.monotonic() < end:
            n += 1
            tag = f"handshake-{n}"
            self.send(data("evolution", CMD="GET", ROOT_ID=tag))
            until = min(end, time.monotonic() + 0.25 * min(n, 8))
            while (left := until - time.monotonic()) > 0:
                try:
                    reply = self.replies.get(timeout=left)
                except queue.Empty:
                    break
                if reply.get("ROOT_ID") == tag:
                    return reply
            self.check()
        raise AssertionError(f"the worker did not answer a GET within {timeout}s")

    def wait_joined(self, pairs: set[tuple[str, str]], timeout: float = 20.0) -> None:
        def done() -> bool:
            self.check()
            return pairs <= set(self.joined)
        try:
            wait_for(done, timeout, "joins")
        except AssertionError:
            raise AssertionError(f"still waiting for joins {sorted(pairs - set(self.joined))}"
                                 ) from None

    def get(self, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        self.send(data("evolution", CMD="GET", **fields))
        try:
            return self.replies.get(timeout=timeout)
        except queue.Empty:
            self.check()
            raise AssertionError(f"no CONTRIBUTION reply within {timeout}s") from None


def model_logits(msg: dict[str, Any], table: dict[int, list[Any]], sent: dict[int, dict],
                 index: int, component_id: str) -> dict[str, Any]:
    """A model's handler, as the RLGym example's: observation in, logits out. The logits
    come from the test's table (seeded), and what was sent is recorded for the reference."""
    step = msg["STEP"]
    logits = table[step][index]
    sent.setdefault(step, {})[component_id] = logits
    return {"LOGITS": logits, "COMPONENT_ID": component_id,
            "DETERMINISTIC": msg["DETERMINISTIC"]}


def model(port: int, index: int, table: dict[int, list[Any]], sent: dict[int, dict],
          name: str | None = None) -> Peer:
    """Model `index`: answers each observation (room `observation`) in room `logits`.
    swergio's client copies ROOT_ID and MODEL_STATUS of the observation into the reply."""
    cid = name or f"model-{index}"
    p = Peer(cid, port, table=table, sent=sent, index=index, component_id=cid)
    p.client.add_eventHandler(model_logits, MESSAGE_TYPE.DATA.CUSTOM, responseRooms="logits",
                              trigger=Trigger(MESSAGE_TYPE.DATA.CUSTOM, "observation"))
    return p


class Environment(Peer):
    """The environment: sends an observation in room `observation`; acts on the ACTION
    that arrives in room `action` by sending the next observation from its handler, until
    the last step of the current run."""

    def __init__(self, port: int, name: str = "environment",
                 deterministic: Callable[[int], bool] = lambda step: True) -> None:
        self.actions: dict[int, dict[str, Any]] = {}    # step -> the action message
        self.observations: dict[int, dict[str, Any]] = {}
        self.state = {"step": -1, "last": -1}
        self.done = threading.Event()
        self.deterministic = deterministic
        super().__init__(name, port, env=self)
        self.client.add_eventHandler(on_action, MESSAGE_TYPE.DATA.CUSTOM,
                                     responseRooms="observation",
                                     trigger=Trigger(MESSAGE_TYPE.DATA.CUSTOM, "action"))

    def observation(self, step: int) -> dict[str, Any]:
        obs = {"STEP": step, "OBSERVATION": [step % 7, step % 3],
               "DETERMINISTIC": self.deterministic(step),
               "ROOT_ID": uuid.uuid4().hex,
               "MODEL_STATUS": 1 + step % 2}   # swergio's MODEL_STATUS ids: TRAIN, VALIDATE
        self.observations[step] = obs
        return obs

    def run(self, first: int, count: int, timeout: float) -> None:
        """Steps first .. first+count-1; returns when the last action has arrived."""
        self.begin(first, count)
        self.wait(timeout)

    def begin(self, first: int, count: int = 1) -> dict[str, Any]:
        """Send the observation of step `first`; the handler goes on to first+count-1.
        Returns the observation."""
        self.state["last"] = first + count - 1
        self.state["step"] = first
        self.done.clear()
        obs = self.observation(first)
        # The listen thread is idle (no action outstanding), so this send races nothing.
        self.send(data("observation", **obs))
        return obs

    def wait(self, timeout: float) -> None:
        """Until the action of the last step of the run has arrived."""
        end = time.monotonic() + timeout
        while not self.done.wait(0.05):
            self.check()
            if time.monotonic() > end:
                raise AssertionError(f"no action for step {self.state['step']} within "
                                     f"{timeout}s (run ends at {self.state['last']})")
        self.check()


def on_action(msg: dict[str, Any], env: Environment) -> dict[str, Any] | None:
    step = env.state["step"]
    assert step not in env.actions, f"a second action for step {step}: {msg}"
    env.actions[step] = msg
    if step >= env.state["last"]:
        env.done.set()
        return None
    env.state["step"] = step + 1
    return env.observation(step + 1)


class Collector(Peer):
    """A peer in one room that keeps every data message it sees there (and may send there
    from the test's thread: its handler never replies)."""

    def __init__(self, name: str, port: int, room: str) -> None:
        self.seen: list[dict[str, Any]] = []
        super().__init__(name, port, seen=self.seen)

        def collect(msg: dict[str, Any], seen: list[dict[str, Any]]) -> None:
            seen.append(msg)

        self.client.add_eventHandler(collect, None,
                                     trigger=Trigger(MESSAGE_TYPE.DATA.CUSTOM, room))

    def wait_seen(self, pred: Callable[[dict[str, Any]], bool], what: str,
                  timeout: float = 10.0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            self.check()
            return next((m for m in list(self.seen) if pred(m)), None)
        return wait_for(found, timeout, f"{self.name} to see {what}")  # type: ignore[no-any-return]


def start_pipeline(port: int, models: int, table: dict[int, list[Any]], sent: dict[int, dict]
                   ) -> tuple[Evolution, Environment, list[Peer], dict[str, Any]]:
    """The RLGym example's peers on the swergio server at `port`, started and seen in their
    rooms: the evolution loop, `models` models answering from `table` (recording in
    `sent`), the environment. Returns them (all of them in the list, to close) and the
    reply to the handshake GET: the worker may have joined before the watcher, and a GET
    answered is the proof that it is in its rooms (it joins them all in one write, which
    the server reads in order, before anything the worker publishes)."""
    evo = Evolution(port).start()
    peers: list[Peer] = [evo]
    try:
        evo.sync(port)
        mods = [model(port, i, table, sent).start() for i in range(models)]
        peers += mods
        env = Environment(port).start()
        peers.append(env)
        evo.wait_joined({(m.name, "logits") for m in mods} | {("environment", "observation")})
        first = evo.handshake()
    except BaseException:
        for p in peers:
            p.close()
        raise
    return evo, env, peers, first
