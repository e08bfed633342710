"""`swarm-aggregator swergio-server`: a swergio 0.0.2 room server without the stalls.

Guarantees:

- Wire: swergio 0.0.2's. A frame is a header of `header_length` bytes (default 10) holding
  the body's length in ASCII, left-justified and space-padded, then a UTF-8 JSON object.
  swergio's own `Client`, the worker's swergio transport and any other client of the PyPI
  server connect unchanged.
- Rooms: swergio 0.0.2's. `COMMAND/REGISTER` names the connection (NAME; again to rename
  it); `COMMAND/JOINROOM` / `COMMAND/LEAVEROOM` add it to or remove it from ROOM (a room is
  made by its first join); `COMMAND/DISCONNECT` closes the connection and goes to no one.
  Every other message, the commands included, goes to the members of its TO_ROOM and to
  every connection registered under its TO, never back to its sender; a message without
  SENT_BY gets the sender's NAME as SENT_BY, one with it is forwarded as received. The
  rooms `_command` and `_logging` always exist; a DATA/FORWARD or DATA/GRADIENT message is
  also sent to every member of `_logging` wrapped in a LOG/MESSAGES message, as the
  original's default (`--no-logging-room` turns that off). Per recipient, messages arrive
  in the order the server read them from their senders.
- Speed: each frame goes to each recipient in one write, with TCP_NODELAY; TCP_QUICKACK is
  re-armed before each read, so a client that writes header and body apart (swergio's
  own, with Nagle's algorithm on) never waits out a delayed acknowledgement. Nothing is
  printed per message: one line at start, one at stop, rate-limited warnings.
- No stalls: a write never waits for its reader. What a client has not read yet is
  buffered up to `--max-buffer-bytes`; a client past that is disconnected (its buffer
  freed, counted, warned), so a slow or stopped reader costs the others nothing and
  memory stays bounded. A dead client's connection is closed by the kernel's error or
  end-of-stream, and the client leaves its rooms and names.
- Size limit: a header announcing more than `--max-message-bytes` (default 16 MiB, as the
  worker's) is seen before its body is read: the body is read in chunks and thrown away,
  counted and warned; the connection stays, its next frame is served.
- Loopback by default (127.0.0.1:8080). The protocol has no authentication: keep the
  server on loopback or a private network.

Where the original's thread for a client dies with an exception (and that client is
dropped without a word), this server decides, and says so in a rate-limited warning:

- a message before REGISTER closes the connection (as the original, but deliberately);
- a header that is not a length closes the connection (the stream cannot be
  resynchronised);
- a body that is not a JSON object, or has no TYPE, or whose NAME, ROOM, TO_ROOM or TO is
  not a string, is dropped; the connection stays (swergio's clients index TYPE, so a
  message without it would break them);
- a message to a room that does not exist goes to no one (the original drops the sender);
  LEAVEROOM of a room one is not in changes nothing; the reserved rooms are never removed
  (the original removes any room whose last member leaves, `_command` included);
- a message addressed by TO to its own sender is not sent back (the original does).

As in the original, a client that is both in TO_ROOM and registered under TO receives the
message twice, and the `_logging` copy goes to all of `_logging`, its sender included:
clients written for the original see what they saw there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger("swarm_aggregator")

RESERVED_ROOMS = ("_command", "_logging")
LOGGED_TYPES = frozenset({"DATA/FORWARD", "DATA/GRADIENT"})
QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
DISCARD_CHUNK = 1 << 20
STREAM_LIMIT = 1 << 20     # the reader's buffer before it pauses reading
YIELD_EVERY = 64           # frames one client may have served in a row before the others
CLOSE_GRACE_S = 5.0        # after DISCONNECT, how long unsent output may still drain
WARN_INTERVAL_S = 10.0
STOP_POLL_S = 0.1
MiB = 1 << 20


class HeaderError(Exception):
    """A header that is not a length: the stream cannot be resynchronised."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    header_length: int = 10
    max_message_bytes: int = 16 * MiB
    max_buffer_bytes: int = 64 * MiB
    logging_room: bool = True

    def check(self) -> None:
        """ValueError naming the option whose value cannot work."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port}: must be 0..65535")
        if self.header_length < 1:
            raise ValueError(f"--header-length {self.header_length}: must be at least 1")
        if self.max_message_bytes < 1:
            raise ValueError(f"--max-message-bytes {self.max_message_bytes}: must be > 0")
        if len(str(self.max_message_bytes)) > self.header_length:
            raise ValueError(f"--max-message-bytes {self.max_message_bytes}: a "
                             f"{self.header_length}-byte header cannot announce it")
        if self.max_buffer_bytes < self.max_message_bytes + self.header_length:
            raise ValueError(f"--max-buffer-bytes {self.max_buffer_bytes}: must hold one "
                             f"message of --max-message-bytes ({self.max_message_bytes})")


def parse_header(header: bytes) -> int:
    """The body length a header announces; HeaderError if it announces none."""
    text = header.strip()
    if not text.isdigit():  # also refuses signs: no negative lengths
        raise HeaderError(f"frame header is not a length: {header[:32]!r}")
    return int(text)


class Warnings:
    """At most one warning line per kind per interval, with the count of those held back."""

    def __init__(self, interval: float = WARN_INTERVAL_S) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def __call__(self, kind: str, text: str) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval) < self.interval:
            self._held[kind] += 1
            return
        held = self._held.pop(kind, 0)
        self._last[kind] = now
        log.warning("swergio-server: %s%s", text,
                    f" ({held} more like it since the last such warning)" if held else "")


class Conn:
    """One client connection: its transport, its NAME and its rooms."""

    __slots__ = ("transport", "sock", "peer", "name", "rooms", "gone")

    def __init__(self, transport: asyncio.WriteTransport, sock: Any, peer: str) -> None:
        self.transport = transport
        self.sock = sock
        self.peer = peer
        self.name: str | None = None
        self.rooms: set[str] = set()
        self.gone = False   # disconnected by us: nothing more is written to it

    def label(self) -> str:
        return f"{self.name!r} ({self.peer})" if self.name is not None else self.peer


class SwergioServer:
    """The rooms and the connections; `start()` listens, `close()` stops."""

    def __init__(self, cfg: ServerConfig) -> None:
        cfg.check()
        self.cfg = cfg
        self.rooms: dict[str, set[Conn]] = {r: set() for r in RESERVED_ROOMS}
        self.names: dict[str, set[Conn]] = {}
        self.conns: set[Conn] = set()
        self.stats: Counter[str] = Counter()
        self.warn = Warnings()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> tuple[str, int]:
        """Listen; the address bound (the port is the real one when asked for 0)."""
        self._server = await asyncio.start_server(
            self._handle, self.cfg.host, self.cfg.port, limit=STREAM_LIMIT,
            reuse_address=True)
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        """Stop listening, close every connection, end every client's task."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for c in list(self.conns):
            c.gone = True
            c.transport.abort()
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        for t in tasks:
            t.cancel()

    def summary(self) -> str:
        s = self.stats
        drops = ", ".join(f"{k[5:]} {v}" for k, v in sorted(s.items()) if k.startswith("drop_"))
        cuts = ", ".join(f"{k[4:]} {v}" for k, v in sorted(s.items()) if k.startswith("cut_"))
        return (f"{s['connections']} connections, {s['frames']} frames in, "
                f"{s['deliveries']} deliveries; dropped: {drops or 'none'}; "
                f"disconnected by the server: {cuts or 'none'}")

    # -- one connection ---------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        transport = writer.transport
        sock = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        conn = Conn(transport, sock, f"{peer[0]}:{peer[1]}" if peer else "?")
        self.conns.add(conn)
        self.stats["connections"] += 1
        try:
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await self._serve(conn, reader)
        except HeaderError as e:
            self._cut(conn, "bad_header", f"{conn.label()}: {e}; disconnected")
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away mid-frame or the kernel says it is gone
        except Exception as e:  # a bug here must cost one connection, not the server
            self._cut(conn, "internal", f"{conn.label()}: unexpected {e!r}; disconnected")
        finally:
            self._leave(conn)
            if task is not None:
                self._tasks.discard(task)
            if transport.get_write_buffer_size() and not conn.gone:
                # Let what is owed drain (a DISCONNECT after a burst), but not forever.
                transport.close()
                asyncio.get_running_loop().call_later(CLOSE_GRACE_S, transport.abort)
            else:
                transport.abort()

    async def _serve(self, conn: Conn, reader: asyncio.StreamReader) -> None:
        """Frames until end of stream, DISCONNECT, or a reason to close."""
        hl = self.cfg.header_length
        limit = self.cfg.max_message_bytes
        sock = conn.sock if QUICKACK is not None else None
        served = 0
        while True:
            # Linux leaves quick-ACK mode by itself (after a few ACKs, or when we write to
            # this client soon after reading from it), so it is re-armed before each read.
            # Armed before the header, the header is acknowledged as it arrives; armed
            # after it, any acknowledgement still pending is sent at once. Either way the
            # client's body, which Nagle holds until that ACK, is not held for 40 ms.
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
            try:
                header = await reader.readexactly(hl)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    self.stats["drop_truncated"] += 1
                return
            n = parse_header(header)
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
            if n > limit:
                self._drop(conn, "too_large", f"a frame of {n} bytes > --max-message-bytes "
                                              f"{limit}; discarded")
                await self._discard(reader, n)
                continue
            body = await reader.readexactly(n)
            self.stats["frames"] += 1
            if not self._dispatch(conn, body):
                return
            served += 1
            if served >= YIELD_EVERY:
                # readexactly does not yield while data is buffered: a client that sends
                # fast must not keep the others waiting.
                served = 0
                await asyncio.sleep(0)

    @staticmethod
    async def _discard(reader: asyncio.StreamReader, n: int) -> None:
        while n > 0:
            chunk = await reader.read(min(n, DISCARD_CHUNK))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", n)
            n -= len(chunk)

    # -- one message ------------------------------------------------------------------------

    def _dispatch(self, conn: Conn, body: bytes) -> bool:
        """Apply and route one message; False when the connection is to be closed."""
        obj = _loads(body)
        problem = _problem(obj)
        if problem is not None:
            self._drop(conn, *problem)
            return True
        kind = obj["TYPE"]
        if kind == "COMMAND/DISCONNECT":
            return False
        verdict = self._command(conn, kind, obj)
        if verdict is not None:
            return verdict
        if "SENT_BY" not in obj:
            body = _with_sender(body, conn.name)
        if len(str(len(body))) > self.cfg.header_length:  # SENT_BY grew it past the header
            self._drop(conn, "too_large", "a message too large to frame with its SENT_BY")
            return True
        self._route(conn, body, obj.get("TO_ROOM"), obj.get("TO"))
        if self.cfg.logging_room and isinstance(kind, str) and kind in LOGGED_TYPES:
            record = _frame(b'{"ID": "%s", "TO_ROOM": "_logging", "TYPE": "LOG/MESSAGES", '
                            b'"MESSAGE": %s}' % (uuid.uuid4().hex.encode(), body),
                            self.cfg.header_length)
            for other in self.rooms["_logging"]:
                self._send(other, record)
        return True

    def _command(self, conn: Conn, kind: Any, obj: dict[str, Any]) -> bool | None:
        """REGISTER, JOINROOM, LEAVEROOM applied; True/False ends the message's handling
        (dropped / connection closed), None lets it be routed as the original does."""
        if kind == "COMMAND/REGISTER":
            name = obj.get("NAME")
            if not isinstance(name, str):
                self._drop(conn, "bad_command", "a REGISTER without a string NAME; dropped")
                return True
            self._register(conn, name)
        elif conn.name is None:
            self._cut(conn, "unregistered", f"{conn.label()} sent {str(kind)[:40]!r} before "
                                            "REGISTER; disconnected")
            return False
        elif kind == "COMMAND/JOINROOM" or kind == "COMMAND/LEAVEROOM":
            room = obj.get("ROOM")
            if not isinstance(room, str):
                self._drop(conn, "bad_command", f"a {kind[8:]} without a string ROOM; "
                                                "dropped")
                return True
            if kind == "COMMAND/JOINROOM":
                self.rooms.setdefault(room, set()).add(conn)
                conn.rooms.add(room)
            else:
                self._part(conn, room)
        return None

    def _route(self, conn: Conn, body: bytes, to_room: str | None, to: str | None) -> None:
        """To the members of TO_ROOM and the clients named TO, never back to the sender."""
        data = _frame(body, self.cfg.header_length)
        send = self._send
        if to_room is not None:
            members = self.rooms.get(to_room)
            if members is None:
                self.stats["drop_no_room"] += 1
            else:
                for other in members:
                    if other is not conn:
                        send(other, data)
        if to is not None:
            for other in self.names.get(to, ()):
                if other is not conn:
                    send(other, data)

    def _send(self, c: Conn, data: bytes) -> None:
        t = c.transport
        if c.gone or t.is_closing():
            return
        t.write(data)  # sent at once when nothing waits before it; else buffered
        self.stats["deliveries"] += 1
        if t.get_write_buffer_size() > self.cfg.max_buffer_bytes:
            # The room is not walked again here: `gone` stops further writes, and the
            # client's own task leaves its rooms once the abort has ended its reads.
            self._cut(c, "slow", f"{c.label()} has not read {t.get_write_buffer_size()} "
                                 f"bytes (> --max-buffer-bytes "
                                 f"{self.cfg.max_buffer_bytes}); disconnected")
            c.gone = True
            t.abort()

    def _register(self, conn: Conn, name: str) -> None:
        if conn.name is not None:
            self._unname(conn)
        conn.name = name
        self.names.setdefault(name, set()).add(conn)

    def _unname(self, conn: Conn) -> None:
        if conn.name is None:
            return
        same = self.names.get(conn.name)
        if same is not None:
            same.discard(conn)
            if not same:
                del self.names[conn.name]

    def _part(self, conn: Conn, room: str) -> None:
        conn.rooms.discard(room)
        members = self.rooms.get(room)
        if members is None:
            return
        members.discard(conn)
        if not members and room not in RESERVED_ROOMS:
            del self.rooms[room]  # rooms come and go: the table does not grow with them

    def _leave(self, conn: Conn) -> None:
        for room in list(conn.rooms):
            self._part(conn, room)
        self._unname(conn)
        self.conns.discard(conn)

    def _drop(self, conn: Conn, reason: str, text: str) -> None:
        self.stats[f"drop_{reason}"] += 1
        self.warn(reason, f"from {conn.label()}: {text}")

    def _cut(self, conn: Conn, reason: str, text: str) -> None:
        self.stats[f"cut_{reason}"] += 1
        self.warn(reason, text)


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    # The original parses with `json`, which also takes NaN and Infinity (a diverged
    # model's logits); such a message is forwarded as the original forwards it.
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def _with_sender(body: bytes, name: str | None) -> bytes:
    """`body` (a JSON object without SENT_BY) with `"SENT_BY": name` as its last member.

    Spliced into the bytes rather than re-encoded: the rest of the message reaches its
    readers as its sender wrote it, and the cost does not grow with its size.
    """
    end = body.rstrip()
    return b'%s, "SENT_BY": %s}' % (end[:-1], orjson.dumps(name))


def _frame(body: bytes, header_length: int) -> bytes:
    return str(len(body)).encode().ljust(header_length) + body


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n} bytes"


# -- the command ----------------------------------------------------------------------------


async def serve(cfg: ServerConfig, stop: threading.Event) -> int:
    """Run the server until `stop` is set; 0 on a clean stop, 2 when it cannot listen."""
    server = SwergioServer(cfg)
    try:
        host, port = await server.start()
    except OSError as e:
        # asyncio words it "error while attempting to bind on address ...": the system's
        # own words are the ones a user searches for.
        reason = os.strerror(e.errno) if e.errno else str(e)
        print(f"swarm-aggregator swergio-server: cannot listen on {cfg.host}:{cfg.port}: "
              f"{reason}", file=sys.stderr)
        return 2
    log.info("swergio-server: listening on %s:%d (swergio 0.0.2 rooms, %d-byte headers, "
             "messages up to %s, up to %s unread per client, _logging copies %s)",
             host, port, cfg.header_length, _size(cfg.max_message_bytes),
             _size(cfg.max_buffer_bytes), "on" if cfg.logging_room else "off")
    try:
        # A flag set by the signal handler, polled: the handler may run at any bytecode,
        # where it must not touch the event loop (see cli._stop_on_signals).
        while not stop.is_set():
            await asyncio.sleep(STOP_POLL_S)
    finally:
        await server.close()
    log.info("swergio-server: stopped; %s", server.summary())
    return 0


def run_server(cfg: ServerConfig, stop: threading.Event) -> int:
    """The `swergio-server` command's body: `serve` in a new event loop."""
    return asyncio.run(serve(cfg, stop))


def _problem(obj: Any) -> tuple[str, str] | None:
    """Why a message cannot be routed (the reason counted, the warning), or None."""
    if not isinstance(obj, dict):
        return "bad_json", "a body that is not a JSON object; dropped"
    if "TYPE" not in obj:
        return "no_type", "a message without TYPE; dropped"
    if ("TO_ROOM" in obj and not isinstance(obj["TO_ROOM"], str)) or \
            ("TO" in obj and not isinstance(obj["TO"], str)):
        return "bad_address", "a TO_ROOM or TO that is not a string; dropped"
    return None
