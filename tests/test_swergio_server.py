"""`swarm-aggregator swergio-server` with the real swergio 0.0.2 clients (PyPI), the worker
(transport.kind = swergio), and the original swergio server beside it for comparison.

Every server and client runs on 127.0.0.1 with ports chosen at run time; each test stops
what it started, and waits on events (a token seen, a thread ended), never on a clock.
No test measures speed: bench/swergio_server_bench.py does.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import orjson
import pytest
from swergio import Client

from bench import rlgym_peers
from processor.apps.processes import stop
from tests.procs import ROOT, free_port, wait_for
from tests.swergio_peers import (
    HOST,
    WORKER_NAME,
    process_output,
    start_pipeline,
    swergio_server,
    worker_process,
    worker_toml,
)

HEADER = 10
LISTENING = re.compile(r"swergio-server: listening on 127\.0\.0\.1:(\d+) ")


# -- our server as the command runs it ------------------------------------------------------


class Ours:
    """`python -m processor swergio-server --port 0 ...`; its log in a temporary file."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Any) -> None:
        self.proc = proc
        self.log = log
        self.port = int(wait_for(self._port, 20, "the server's start line", step=0.02))

    def _port(self) -> str | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"swergio-server exited {self.proc.returncode}:\n"
                                 f"{self.output()}")
        m = LISTENING.search(self.output())
        return m.group(1) if m else None

    def output(self) -> str:
        self.log.seek(0)
        return str(self.log.read().decode(errors="replace"))

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Signal it, wait; its exit code and everything it printed."""
        if not stop(self.proc, sig):
            raise AssertionError("swergio-server did not stop within 10 s")
        return self.proc.returncode, self.output()

    def rss_peak_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc")


@contextmanager
def ours(*args: str) -> Iterator[Ours]:
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "processor", "swergio-server",
                                 "--port", "0", *args], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            yield Ours(proc, log)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def summary(output: str) -> str:
    m = re.search(r"swergio-server: stopped; (.*)", output)
    assert m, output[-2000:]
    return m.group(1)


# -- clients --------------------------------------------------------------------------------


def frame(obj: dict[str, Any] | bytes) -> bytes:
    body = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    return str(len(body)).encode().ljust(HEADER) + body


def command(kind: str, **fields: Any) -> dict[str, Any]:
    return {"ID": uuid.uuid4().hex, "TYPE": f"COMMAND/{kind}", "TO_ROOM": "_command",
            **fields}


def data(room: str | None = None, **fields: Any) -> dict[str, Any]:
    msg = {"ID": uuid.uuid4().hex, "TYPE": "DATA/CUSTOM", **fields}
    if room is not None:
        msg["TO_ROOM"] = room
    return msg


class Raw:
    """A client written from the protocol with a plain socket: for what swergio's Client
    cannot do (stop reading, send a broken frame, die mid-frame)."""

    def __init__(self, port: int, name: str | None = None, rooms: tuple[str, ...] = (),
                 rcvbuf: int = 0, timeout: float = 10.0) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((HOST, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        if name is not None:
            self.send(command("REGISTER", NAME=name))
        for room in rooms:
            self.send(command("JOINROOM", ROOM=room))

    def send(self, msg: dict[str, Any] | bytes) -> None:
        self.sock.sendall(msg if isinstance(msg, bytes) else frame(msg))

    def recv(self) -> dict[str, Any]:
        """The next message; TimeoutError after the socket's timeout, EOFError at the end."""
        while True:
            if len(self.buf) >= HEADER:
                n = int(self.buf[:HEADER])
                if len(self.buf) >= HEADER + n:
                    body = bytes(self.buf[HEADER:HEADER + n])
                    del self.buf[:HEADER + n]
                    return json.loads(body)  # type: ignore[no-any-return]
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("the server closed the connection")
            self.buf += chunk

    def next_data(self) -> dict[str, Any]:
        """The next message that is not a command (others' REGISTER and JOINROOM)."""
        while True:
            msg = self.recv()
            if not str(msg.get("TYPE", "")).startswith("COMMAND/"):
                return msg

    def closed_by_server(self) -> bool:
        """Read (and drop) what is left until the server's end of stream or reset."""
        try:
            while self.sock.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


class Observer(Raw):
    """In `_command` and `_sync`. `after(client)`: the client sends a token to `_sync` and
    this waits for it, so everything the client sent before has been routed (a server
    handles one client's frames in order). It first makes sure the server has its rooms:
    a probe registers until this sees the probe's REGISTER in `_command` (the original
    server drops a client that sends to a room that does not exist yet)."""

    def __init__(self, port: int) -> None:
        super().__init__(port, "observer", ("_sync", "_command"))
        self.tokens = 0
        end = time.monotonic() + 20
        while True:
            probe = Raw(port, f"probe-{uuid.uuid4().hex[:8]}")
            name = probe.sock.getsockname()
            probe.send(command("DISCONNECT"))
            probe.closed_by_server()
            probe.close()
            self.sock.settimeout(0.5)
            try:
                if self._seen(lambda m: m.get("TYPE") == "COMMAND/REGISTER"):
                    break
            except TimeoutError:
                assert time.monotonic() < end, f"the observer saw no probe ({name})"
            finally:
                self.sock.settimeout(10)

    def _seen(self, pred: Any) -> dict[str, Any]:
        while True:
            msg = self.recv()
            if pred(msg):
                return msg

    def after(self, client: Any) -> None:
        self.tokens += 1
        token = self.tokens
        client.send(data("_sync", TOKEN=token))
        self._seen(lambda m: m.get("TOKEN") == token)


class Recorder:
    """A real swergio Client whose every received message is kept, read in a thread by
    the client's own `receive()`, until an END message or the end of the connection."""

    def __init__(self, port: int, name: str) -> None:
        self.client = Client(name, HOST, port, "utf-8", HEADER)
        # Timing only (no 40 ms stalls per frame in a test); the bytes are the same.
        self.client.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.seen: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            msg = self.client.receive()
            if msg is False:
                return
            self.seen.append(msg)
            if msg.get("END"):
                return

    def send(self, msg: dict[str, Any]) -> None:
        self.client.send(msg)

    def join(self, timeout: float = 10.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.client.name}: no END within {timeout}s"

    def close(self) -> None:
        rlgym_peers.close(self.client, self.thread)


# -- 1. the same deliveries as the original ---------------------------------------------------


def script(port: int) -> dict[str, list[dict[str, Any]]]:
    """One scripted session of swergio clients; what each received, in order.

    Steps are serialised through the observer, so each client's sequence is determined by
    the server's rules alone. The script stays within what the original handles without
    a thread dying (see the module docstring of processor/apps/swergio_server.py): every
    room sent to exists, every sender is registered, no one sends to itself by TO.
    """
    with ExitStack() as stack:
        obs = Observer(port)
        stack.callback(obs.close)
        rec: dict[str, Recorder] = {}

        def client(label: str, name: str) -> Recorder:
            r = Recorder(port, name)
            stack.callback(r.close)
            rec[label] = r
            obs.after(r)
            return r

        def say(c: Recorder, **msg: Any) -> None:
            c.send(msg)
            obs.after(c)

        alpha, beta, gamma = client("alpha", "alpha"), client("beta", "beta"), \
            client("gamma", "gamma")
        for c, room in ((alpha, "room1"), (beta, "room1"), (gamma, "room2"),
                        (beta, "_logging"), (alpha, "_logging")):
            c.client.join_room(room)
            obs.after(c)
        # Rooms: to the members but the sender; SENT_BY added or kept; a non-member sends.
        say(alpha, ID="m1", TYPE="DATA/CUSTOM", TO_ROOM="room1", N=1, TEXT="ünï ☃")
        say(beta, ID="m2", TYPE="DATA/CUSTOM", TO_ROOM="room1", N=2, SENT_BY="someone")
        say(gamma, ID="m3", TYPE="DATA/CUSTOM", TO_ROOM="room1", N=3, X=[[1.5, -2e-7], {}])
        # By name; by name and room; to no one.
        say(alpha, ID="m4", TYPE="DATA/CUSTOM", TO="gamma", N=4)
        say(alpha, ID="m5", TYPE="DATA/CUSTOM", TO_ROOM="room2", TO="beta", N=5)
        say(beta, ID="m6", TYPE="DATA/CUSTOM", TO="alpha", TO_ROOM="room1", N=6)
        say(alpha, ID="m7", TYPE="DATA/CUSTOM", N=7)
        twin1, twin2 = client("twin1", "twin"), client("twin2", "twin")
        twin1.client.join_room("room2")
        obs.after(twin1)
        say(alpha, ID="m8", TYPE="DATA/CUSTOM", TO="twin", N=8)
        say(twin2, ID="m9", TYPE="DATA/CUSTOM", TO_ROOM="room2", N=9)
        # The reserved rooms: commands to `_command`; FORWARD and GRADIENT copied into
        # `_logging` (to all of it, the sender too), other types not.
        say(alpha, ID="m10", TYPE="COMMAND/CUSTOM", TO_ROOM="_command", N=10)
        say(alpha, ID="m11", TYPE="DATA/FORWARD", TO_ROOM="room1", DATA=[1, 2], N=11)
        say(gamma, ID="m12", TYPE="DATA/GRADIENT", TO_ROOM="room2", DATA=[3], N=12)
        say(gamma, ID="m13", TYPE="DATA/REWARD", TO_ROOM="room2", DATA=[4], N=13)
        say(twin1, ID="m14", TYPE="LOG/CUSTOM", TO_ROOM="_logging", N=14)
        # Leaving a room; registering again under another name.
        say(beta, ID="l1", TYPE="COMMAND/LEAVEROOM", ROOM="room1", TO_ROOM="_command")
        say(gamma, ID="m15", TYPE="DATA/CUSTOM", TO_ROOM="room1", N=15)
        say(gamma, ID="r1", TYPE="COMMAND/REGISTER", NAME="delta", TO_ROOM="_command")
        say(alpha, ID="m16", TYPE="DATA/CUSTOM", TO="gamma", N=16)
        say(alpha, ID="m17", TYPE="DATA/CUSTOM", TO="delta", N=17)
        say(gamma, ID="m18", TYPE="DATA/CUSTOM", TO_ROOM="room2", N=18)
        # DISCONNECT: the server closes; it goes to no one; the name and rooms are gone.
        # (As swergio's Client.close() sends it, but beta reads on until the server closes
        # the connection, and a round trip through the server follows: the original drops
        # the name after closing, and a message for a name it still holds, sent to a
        # closed socket, would end the *sender's* thread. Without these two waits a busy
        # machine could show that race instead of the rule.)
        beta.send({"ID": "d1", "TYPE": "COMMAND/DISCONNECT", "TO_ROOM": "_command"})
        beta.join()
        beta.client.client.close()
        obs.after(gamma)
        say(alpha, ID="m19", TYPE="DATA/CUSTOM", TO_ROOM="room2", N=19)
        say(alpha, ID="m20", TYPE="DATA/CUSTOM", TO="beta", N=20)
        say(gamma, ID="m21", TYPE="DATA/CUSTOM", TO_ROOM="_logging", N=21)
        driver = client("driver", "driver")
        for name in ("alpha", "delta", "twin"):
            say(driver, ID=f"end-{name}", TYPE="DATA/CUSTOM", TO=name, END=True)
        for label in ("alpha", "gamma", "twin1", "twin2"):
            rec[label].join()
        return {label: [normal(m) for m in r.seen] for label, r in rec.items()
                if label != "driver"}


def normal(msg: dict[str, Any]) -> dict[str, Any]:
    """A message without what is random per run: the IDs swergio's Client and the
    original server make up for commands and LOG/MESSAGES (the script's own IDs stay)."""
    out = dict(msg)
    if not str(out.get("ID", "")).startswith(("m", "l", "r", "end-")) or \
            out.get("TYPE") == "LOG/MESSAGES":
        out.pop("ID", None)
    return out


@pytest.mark.timeout(90)
def test_same_deliveries_per_client_as_the_original_server():
    with swergio_server(free_port()) as original:
        port = int(original.args[-1])
        theirs = script(port)
    with ours() as server:
        mine = script(server.port)
        code, out = server.stop()
    assert code == 0, out
    assert set(mine) == set(theirs) == {"alpha", "beta", "gamma", "twin1", "twin2"}
    for label in theirs:
        assert mine[label] == theirs[label], label

    # What the script shows, spelled out (on both servers, as they are equal).
    def ids(label: str) -> list[str]:
        return [m["ID"] for m in mine[label] if "ID" in m]

    by_id = {m["ID"]: m for label in mine for m in mine[label] if "ID" in m}
    assert by_id["m1"]["SENT_BY"] == "alpha" and by_id["m1"]["TEXT"] == "ünï ☃"  # added
    assert by_id["m2"]["SENT_BY"] == "someone"                                  # kept
    assert "m1" in ids("beta") and "m1" not in ids("alpha")                     # no echo
    assert "m3" not in ids("gamma")                        # a non-member sends: no echo
    assert "m3" in ids("alpha") and "m3" in ids("beta")
    assert "m4" in ids("gamma") and "m4" not in ids("beta")                     # TO
    assert "m5" in ids("gamma") and "m5" in ids("beta")                         # room and TO
    assert ids("alpha").count("m6") == 2                  # in the room and named: twice
    assert not any("m7" in ids(x) for x in mine)                                # no address
    assert "m8" in ids("twin1") and "m8" in ids("twin2")                        # same name
    assert "m10" in ids("beta") and "m10" in ids("twin1")                       # _command
    logged = {label: [m["MESSAGE"]["ID"] for m in mine[label]
                      if m.get("TYPE") == "LOG/MESSAGES"] for label in mine}
    assert logged["alpha"] == ["m11", "m12"] and logged["beta"] == ["m11", "m12"]
    assert "m14" in ids("alpha") and "m14" in ids("beta")
    assert "m15" in ids("alpha") and "m15" not in ids("beta")                   # left room1
    assert "m16" not in ids("gamma") and "m17" in ids("gamma")                  # renamed
    assert by_id["m18"]["SENT_BY"] == "delta"
    assert "m19" not in ids("beta") and "m20" not in ids("beta")                # gone
    assert "m21" in ids("alpha")
    registered = [m["SENT_BY"] for m in mine["alpha"] if m["TYPE"] == "COMMAND/REGISTER"]
    assert registered[:2] == ["beta", "gamma"] and "delta" in registered
    assert not any(m.get("TYPE") == "COMMAND/DISCONNECT" for x in mine for m in mine[x])
    assert "stopped; " in out and "dropped: none" in summary(out)


# -- 2. the worker through our server -----------------------------------------------------------


@pytest.mark.timeout(120)
def test_worker_and_rlgym_peers_through_our_server():
    """The drop-in pair: our server and the worker (`swarm-aggregator run`, kind swergio),
    with the RLGym example's other components as real swergio Clients, unchanged."""
    models, steps = 6, 60
    rng = np.random.default_rng(3)
    table = {s: rng.normal(0, 2, (models, 2)).astype(np.float32).tolist() for s in range(steps)}
    sent: dict[int, dict[str, list[float]]] = {}
    with ours() as server:
        port = server.port
        with worker_process(worker_toml(port, models)) as worker:
            evo, env, peers, first = start_pipeline(port, models, table, sent)
            mods = [p for p in peers if p is not evo and p is not env]
            try:
                assert first["CONTRIBUTION"] == {}
                env.run(0, steps, timeout=60)
                reply = evo.get()
            finally:
                for p in peers:
                    p.close()
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(10) == 0
            log = process_output(worker)
        code, out = server.stop(signal.SIGINT)
    assert code == 0, out
    for s in range(steps):
        x = np.asarray(list(sent[s].values()), dtype=np.float64)
        p = np.exp(x - x.max(axis=1, keepdims=True))
        best = int((p / p.sum(axis=1, keepdims=True)).sum(axis=0).argmax())
        msg = env.actions[s]
        assert msg["ACTION"] == [best] and msg["SENT_BY"] == WORKER_NAME
        assert msg["ROOT_ID"] == env.observations[s]["ROOT_ID"]
    assert set(reply["CONTRIBUTION"]) == {m.name for m in mods}
    assert sum(reply["CONTRIBUTION"].values()) == pytest.approx(steps, rel=1e-4)
    assert log.count("swergio: connected to") == 1
    # One line at start, one at stop: nothing per message.
    lines = [x for x in out.splitlines() if x.strip()]
    assert len(lines) == 2, out
    assert "dropped: none" in summary(out) and "disconnected by the server: none" in out


# -- 3. what we decide where the original's thread dies ------------------------------------------


@pytest.mark.timeout(60)
def test_deliberate_differences_keep_the_connection_or_close_it_cleanly():
    with ours() as server:
        port = server.port
        obs = Observer(port)
        a = Raw(port, "a", ("x",))
        b = Raw(port, "b", ("x",))
        obs.after(a)
        obs.after(b)
        a.send(data("x", TO="a", N=1))           # its own name: not sent back; b gets it
        a.send(data("nowhere", N=2))             # no such room: to no one, a stays
        a.send(b"8         not json")            # not JSON: dropped
        a.send({"TO_ROOM": "x", "N": 3})         # no TYPE: dropped
        a.send(data(["x"], N=4))                 # TO_ROOM not a string: dropped
        a.send(command("LEAVEROOM", ROOM="never-joined"))
        a.send(frame(b'{"TYPE": "DATA/CUSTOM", "TO_ROOM": "x", "N": 5, "V": NaN}'))
        # (`json` reads NaN, as the original does: forwarded)
        a.send(data("x", N=6))
        got = [b.next_data() for _ in range(3)]
        assert [m["N"] for m in got] == [1, 5, 6]
        assert got[0]["SENT_BY"] == "a"
        obs.after(a)
        a.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            a.next_data()                        # nothing came back to the sender

        # A message before REGISTER: that connection is closed, no one else is touched.
        stranger = Raw(port, None)
        stranger.send(data("x", N=7))
        assert stranger.closed_by_server()
        # A header that is not a length: that connection is closed.
        broken = Raw(port, "broken")
        broken.send(b"abcdefghij{}")
        assert broken.closed_by_server()
        # The reserved rooms stay when their last member leaves.
        lone = Raw(port, "lone", ("_logging",))
        lone.send(command("LEAVEROOM", ROOM="_logging"))
        lone.send(command("JOINROOM", ROOM="_logging"))
        obs.after(lone)
        a.send(data("_logging", N=8))
        assert lone.next_data()["N"] == 8
        b.send(data("x", N=9))
        a.sock.settimeout(10)
        assert a.next_data()["N"] == 9
        for c in (obs, a, b, stranger, broken, lone):
            c.close()
        code, out = server.stop()
    assert code == 0, out
    s = summary(out)
    for part in ("no_room 1", "bad_json 1", "no_type 1", "bad_address 1",
                 "unregistered 1", "bad_header 1"):
        assert part in s, (part, s)
    assert "Traceback" not in out


# -- 4. limits: oversized frames, a reader that stops, a client that dies --------------------


@pytest.mark.timeout(60)
def test_oversized_frames_are_discarded_unread_and_the_sender_stays():
    with ours("--max-message-bytes", "1000", "--max-buffer-bytes", "100000") as server:
        port = server.port
        obs = Observer(port)
        a, b = Raw(port, "a", ("x",)), Raw(port, "b", ("x",))
        obs.after(a)
        obs.after(b)
        before = server.rss_peak_kib()
        a.send(data("x", N=1, PAD="p" * 5000))  # over the limit: discarded
        a.send(data("x", N=2))
        assert b.next_data()["N"] == 2
        # A header announcing 9.3 GB, then 64 MiB of it: read in chunks, never held; the
        # others are served meanwhile.
        huge = Raw(port, "huge")
        obs.after(huge)
        errors: list[BaseException] = []

        def junk() -> None:
            try:
                huge.send(b"9999999999")
                chunk = b"z" * (1 << 20)
                for _ in range(64):
                    huge.sock.sendall(chunk)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        sender = threading.Thread(target=junk, daemon=True)
        sender.start()
        for n in range(3, 40):
            a.send(data("x", N=n))
            assert b.next_data()["N"] == n
        sender.join(30)
        assert not sender.is_alive() and not errors, errors
        a.send(data("x", N=40))
        assert b.next_data()["N"] == 40
        grown = server.rss_peak_kib() - before
        assert grown < 16 * 1024, f"peak memory grew by {grown} KiB for 64 MiB discarded"
        for c in (obs, a, b, huge):
            c.close()
        code, out = server.stop()
    assert code == 0
    assert "too_large 2" in summary(out)


def _started(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def _readable_until_cut(sock: socket.socket) -> int:
    """Bytes a socket still delivers before its end (EOF or reset)."""
    received = 0
    try:
        while chunk := sock.recv(1 << 16):
            received += len(chunk)
    except ConnectionResetError:
        pass
    return received


@pytest.mark.timeout(90)
def test_a_client_that_stops_reading_stalls_no_one_and_is_disconnected():
    """48 MiB pass through a room whose other member reads nothing, while two clients make
    round trips. The flood is paced by its healthy reader (8 frames ahead at most), so
    only the stopped reader can fall behind by more than --max-buffer-bytes."""
    size, frames, ahead = 64 * 1024, 768, 8
    limit = 1 << 20
    with ours("--max-buffer-bytes", str(limit), "--max-message-bytes", str(256 * 1024)
              ) as server:
        port = server.port
        obs = Observer(port)
        stopped = Raw(port, "stopped", ("flood",), rcvbuf=4096)
        healthy = Raw(port, "healthy", ("flood",))
        flooder = Raw(port, "flooder")
        ping = Recorder(port, "ping")          # a real swergio Client
        ping.client.join_room("pong-room")
        pong = Raw(port, "pong", ("ping-room",))
        for c in (stopped, healthy, flooder, ping, pong):
            obs.after(c)
        before = server.rss_peak_kib()

        read = [0]
        rounds = [0]
        errors: list[BaseException] = []

        def read_flood() -> None:
            try:
                while read[0] < frames:
                    healthy.next_data()
                    read[0] += 1
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        def round_trips() -> None:
            try:
                for n in range(200):
                    ping.send(data("ping-room", N=n))
                    while pong.next_data().get("N") != n:
                        pass
                    pong.send(data("pong-room", N=n))
                    wait_for(lambda: any(m.get("N") == n for m in ping.seen[-3:]),  # noqa: B023
                             20, f"pong {n}", step=0.0005)
                    rounds[0] += 1
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [_started(f) for f in (read_flood, round_trips)]
        body = frame(data("flood", SENT_BY="flooder", PAD="f" * size))
        for sent in range(frames):
            wait_for(lambda: read[0] >= sent - ahead or errors, 20,  # noqa: B023
                     "the healthy reader", step=0.0005)
            flooder.send(body)
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert read[0] == frames and rounds[0] == 200
        grown = server.rss_peak_kib() - before
        assert grown < 24 * 1024, f"peak memory grew by {grown} KiB while 48 MiB passed"
        # The stopped reader was cut off: what it can still read ends early.
        assert _readable_until_cut(stopped.sock) < frames * size // 4
        for c in (obs, stopped, healthy, flooder, pong):
            c.close()
        ping.close()
        code, out = server.stop()
    assert code == 0
    assert "slow 1" in summary(out)
    assert out.count("has not read") == 1


@pytest.mark.timeout(60)
def test_a_dead_client_leaves_its_rooms_and_name_and_the_others_go_on():
    code_ = ("import sys\nfrom swergio import Client\n"
             "c = Client('doomed', '127.0.0.1', int(sys.argv[1]), 'utf-8', 10)\n"
             "c.join_room('r')\nprint('ready', flush=True)\nc.listen()\n")
    with ours() as server:
        port = server.port
        obs = Observer(port)
        a, b = Raw(port, "a", ("r",)), Raw(port, "b", ("r",))
        obs.after(a)
        obs.after(b)
        doomed = subprocess.Popen([sys.executable, "-c", code_, str(port)], cwd=ROOT,
                                  stdout=subprocess.PIPE)
        try:
            assert doomed.stdout is not None and doomed.stdout.readline() == b"ready\n"
            obs._seen(lambda m: m.get("TYPE") == "COMMAND/JOINROOM" and
                      m.get("SENT_BY") == "doomed" and m.get("ROOM") == "r")
            doomed.kill()
            doomed.wait(10)
        finally:
            if doomed.poll() is None:
                doomed.kill()
                doomed.wait()
        # A client that dies in the middle of a frame.
        cut = Raw(port, "cut", ("r",))
        cut.send(b"100       " + b'{"TYPE": ')
        cut.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cut.close()  # linger 0: a reset, as a crash leaves it
        for n in range(50):
            a.send(data("r", N=n))
            a.send(data(None, TO="doomed", N=n))
            assert b.next_data()["N"] == n
        again = Raw(port, "doomed")
        obs.after(again)
        a.send(data(None, TO="doomed", N=99))
        assert again.next_data()["N"] == 99
        for c in (obs, a, b, again):
            c.close()
        code, out = server.stop()
    assert code == 0
    assert "Traceback" not in out


# -- 5. the command ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_command_start_line_signals_and_start_errors():
    with ours() as server:
        line = [x for x in server.output().splitlines() if x.strip()]
        assert len(line) == 1 and "swergio-server: listening on 127.0.0.1:" in line[0]
        assert "16 MiB" in line[0] and "64 MiB" in line[0]
        port = server.port
        # The port in use: one line, exit 2.
        busy = subprocess.run([sys.executable, "-m", "processor", "swergio-server", "--port",
                               str(port)], cwd=ROOT, capture_output=True, text=True,
                              timeout=30, check=False)
        assert busy.returncode == 2
        assert busy.stderr.strip().splitlines() == [
            f"swarm-aggregator swergio-server: cannot listen on 127.0.0.1:{port}: "
            "Address already in use"]
        code, out = server.stop(signal.SIGTERM)
        assert code == 0 and "stopped; 0 connections" in out
    with ours() as server:
        client = Raw(server.port, "idle", ("x",))  # a client still connected at the stop
        obs = Observer(server.port)
        obs.after(client)
        code, out = server.stop(signal.SIGINT)
        assert code == 0 and "Traceback" not in out
        assert client.closed_by_server() and obs.closed_by_server()
        client.close()
        obs.close()
    bad = subprocess.run([sys.executable, "-m", "processor", "swergio-server",
                          "--header-length", "4"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30, check=False)
    assert bad.returncode == 2
    assert "--max-message-bytes 16777216: a 4-byte header cannot announce it" in bad.stderr
