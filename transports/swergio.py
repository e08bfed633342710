"""swergio transport: a client of the swergio 0.0.2 room server (PyPI `swergio`).

Wire format: TCP; each frame is a header of `header_length` bytes holding the body's
length in ASCII (left-justified, space-padded), then the UTF-8 JSON body. On connect the
client sends `COMMAND/REGISTER` with its NAME, then `COMMAND/JOINROOM` for `_command` and
each room it uses, all with `TO_ROOM: "_command"`. The room of a message travels inside its
body (`TO_ROOM`), so this transport reads it: only `DATA/CUSTOM` messages (the original
aggregator reacts to no other) to the logits or evolution room are the worker's, and they
reach it decoded, under their room as topic. Most traffic in the shared rooms (commands,
WEIGHTS) is recognised as not the worker's from its bytes and never parsed.

Guarantees: TCP order from the server; at-most-once: while the server is away nothing is
received, and actions or replies that cannot be sent are counted and dropped. The worker
reconnects with exponential backoff and joins its rooms again. The protocol has no
authentication: keep the server on loopback or a private network.

Unlike swergio's own client, every frame goes out in one write with TCP_NODELAY on, so no
step waits on Nagle's algorithm and delayed ACKs. The other direction is the server's: the
swergio 0.0.2 server writes each frame as two writes (header, then body) with Nagle's
algorithm on, so the body waits for the ACK of the header, which Linux delays by up to 40 ms
once a connection is interactive. The worker therefore acknowledges every header at once
(TCP_QUICKACK, where the platform has it).

Reconnecting: the delay between attempts doubles (from `reconnect_min_s` to
`reconnect_max_s`) while attempts fail, and also while connections die young (a server that
accepts and then drops us, or sends a stream we cannot read); it starts again from the
minimum after a connection that delivered a frame or lasted `reconnect_max_s`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
import uuid
from types import TracebackType
from typing import Any, Self

import orjson

from processor.config import Config
from processor.errors import RejectedError
from processor.messages import decode_object

from .base import MAX_BURST, Envelope, RejectHook

log = logging.getLogger("swarm_aggregator.swergio")

QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
CONNECT_TIMEOUT_S = 10.0
INBOX_LIMIT = 100_000  # frames read but not yet taken; past it, stop reading (TCP backpressure)
DISCARD_CHUNK = 1 << 20


class FrameError(Exception):
    """A header that is not a length: the stream cannot be resynchronised."""


def frame(body: bytes, header_length: int) -> bytes:
    """One swergio frame: the padded ASCII length, then the body."""
    header = str(len(body)).encode().ljust(header_length)
    if len(header) > header_length:
        raise ValueError(f"body of {len(body)} bytes does not fit a {header_length}-byte header")
    return header + body


def parse_header(header: bytes) -> int:
    """The body length a header announces; FrameError if it announces none."""
    text = header.strip()
    if not text.isdigit():  # also refuses signs, so no negative lengths
        raise FrameError(f"frame header is not a length: {header[:32]!r}")
    return int(text)


class SwergioTransport:
    acks = False

    def __init__(self, cfg: Config, on_reject: RejectHook) -> None:
        self.cfg = cfg.transport.swergio
        self.rooms = ("_command", cfg.topics.logits, cfg.topics.evolution, cfg.topics.action)
        self.inbound = (cfg.topics.logits, cfg.topics.evolution)
        self.max_bytes = cfg.limits.max_message_bytes
        self.on_reject = on_reject
        self.ready = False
        self.connects = 0       # successful connections so far (1 + reconnects)
        self.dropped_out = 0    # messages not sent because the server was away
        self._writer: asyncio.StreamWriter | None = None
        self._inbox: collections.deque[Envelope] = collections.deque()
        self._has_data = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._frames = 0        # frames read on the current connection

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="swergio-connection")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._closing = True
        w = self._writer
        if w is not None and not w.is_closing():
            try:
                w.write(self._frame({"ID": uuid.uuid4().hex, "TYPE": "COMMAND/DISCONNECT",
                                     "TO_ROOM": "_command"}))
                await asyncio.wait_for(w.drain(), 1.0)
            except (OSError, TimeoutError):
                pass
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.ready = False

    def _frame(self, obj: dict[str, Any]) -> bytes:
        return frame(orjson.dumps(obj), self.cfg.header_length)

    async def _run(self) -> None:
        cfg = self.cfg
        delay = cfg.reconnect_min_s
        while not self._closing:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(cfg.host, cfg.port), CONNECT_TIMEOUT_S)
            except OSError as e:  # TimeoutError included
                log.warning("swergio server %s:%s unreachable (%s); retrying in %.1fs",
                            cfg.host, cfg.port, e or type(e).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, cfg.reconnect_max_s)
                continue
            self._writer = writer
            self._frames = 0
            since = time.monotonic()
            try:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._join(writer)
                await writer.drain()
                self.ready = True
                self.connects += 1
                log.info("swergio: connected to %s:%s as %r, rooms %s", cfg.host,
                         cfg.port, cfg.name, ", ".join(self.rooms[1:]))
                await self._read(reader, sock if QUICKACK is not None else None)
                if not self._closing:  # (when closing, the server answers DISCONNECT so)
                    log.warning("swergio server closed the connection; reconnecting")
            except (OSError, asyncio.IncompleteReadError) as e:
                log.warning("swergio connection lost (%s); reconnecting", e or type(e).__name__)
            except FrameError as e:
                self.on_reject("bad_frame", str(e))
                log.error("swergio: %s; reconnecting to resynchronise", e)
            except Exception:  # this task must outlive any one connection
                log.exception("swergio: unexpected error; reconnecting")
            finally:
                self.ready = False
                self._writer = None
                writer.close()
            if self._frames or time.monotonic() - since >= cfg.reconnect_max_s:
                delay = cfg.reconnect_min_s  # a healthy connection: start the backoff again
            if not self._closing:
                await asyncio.sleep(delay)
                delay = min(delay * 2, cfg.reconnect_max_s)

    def _join(self, writer: asyncio.StreamWriter) -> None:
        out = [self._frame({"ID": uuid.uuid4().hex, "TYPE": "COMMAND/REGISTER",
                            "NAME": self.cfg.name, "TO_ROOM": "_command"})]
        for room in self.rooms:
            out.append(self._frame({"ID": uuid.uuid4().hex, "TYPE": "COMMAND/JOINROOM",
                                    "ROOM": room, "TO_ROOM": "_command"}))
        writer.write(b"".join(out))

    async def _read(self, reader: asyncio.StreamReader, quickack: Any = None) -> None:
        """Frames into the inbox until EOF. `quickack`: the socket, to acknowledge each
        header at once (see the module's docstring)."""
        hl = self.cfg.header_length
        inbox = self._inbox
        while True:
            try:
                header = await reader.readexactly(hl)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise
                return  # clean EOF between frames
            if quickack is not None:
                quickack.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
            n = parse_header(header)
            if n > self.max_bytes:
                await self._discard(reader, n)
                self.on_reject("too_large", f"swergio frame of {n} bytes > {self.max_bytes}")
                continue
            body = await reader.readexactly(n)
            self._frames += 1
            inbox.append((None, body, time.monotonic(), None))  # routed when received
            self._has_data.set()
            if len(inbox) >= INBOX_LIMIT:
                self._has_room.clear()
                await self._has_room.wait()

    def _route(self, frame: Envelope) -> Envelope | None:
        """The worker's envelope of one frame, or None when the frame is not for it."""
        body, at = frame[1], frame[2]
        if not isinstance(body, bytes) or (b'"LOGITS"' not in body and b'"CMD"' not in body):
            return None
        try:
            obj = decode_object(body, self.max_bytes)
        except RejectedError as e:
            self.on_reject(e.reason, e.detail)
            return None
        room = obj.get("TO_ROOM")
        if obj.get("TYPE") != "DATA/CUSTOM" or room not in self.inbound:
            return None
        return room, obj, at, None

    @staticmethod
    async def _discard(reader: asyncio.StreamReader, n: int) -> None:
        while n > 0:
            chunk = await reader.read(min(n, DISCARD_CHUNK))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", n)
            n -= len(chunk)

    async def receive(self, timeout: float | None) -> list[Envelope]:
        inbox = self._inbox
        if not inbox:
            self._has_data.clear()
            try:
                await asyncio.wait_for(self._has_data.wait(), timeout)
            except TimeoutError:
                return []
        if len(inbox) <= MAX_BURST:
            frames = list(inbox)
            inbox.clear()
        else:
            frames = [inbox.popleft() for _ in range(MAX_BURST)]
        self._has_room.set()
        route = self._route
        return [e for e in map(route, frames) if e is not None]

    async def publish(self, topic: str, payload: bytes, dedup: str | None = None) -> bool:
        w = self._writer
        if w is None or not self.ready or w.is_closing():
            self.dropped_out += 1
            return False
        w.write(frame(payload, self.cfg.header_length))
        if w.transport.get_write_buffer_size() > 1 << 20:
            try:
                await w.drain()
            except OSError:
                return False
        return True

    def counters(self) -> dict[str, int]:
        """Events of this transport so far, for metrics (by event name)."""
        return {"reconnect": max(0, self.connects - 1), "send_dropped": self.dropped_out}

    async def settle(self, tokens: list[Any]) -> None:
        pass  # at-most-once: nothing to acknowledge

    def stamp(self, topic: str) -> dict[str, Any] | None:
        return {"ID": uuid.uuid4().hex, "TYPE": "DATA/CUSTOM", "TO_ROOM": topic,
                "SENT_BY": self.cfg.name}
