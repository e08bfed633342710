"""The peers' side of swergio 0.0.2: one registered connection to the room server.

Guarantees: TCP order through the server; at-most-once (the server forwards to whoever is in
a room at that moment; nothing is kept). No reconnection: when the server goes away, the
next call raises ClientError. The wire rules users get wrong are kept here:

- on connect, `COMMAND/REGISTER` with the NAME, then `COMMAND/JOINROOM` for `_command`,
  all `TO_ROOM: "_command"`, in one write; a room is joined before the first message to it
  (the server drops a client that sends to a room nobody has joined);
- each frame (padded ASCII length, then the JSON body) in one write, with TCP_NODELAY, so
  no frame waits on Nagle's algorithm and a delayed ACK;
- TCP_QUICKACK after each header read (Linux): the server writes header and body apart,
  with Nagle on, so its body waits for our ACK of the header unless we send it at once;
- objects go out as `DATA/CUSTOM` with `ID`, `TO_ROOM` and `SENT_BY` (with SENT_BY the
  server forwards our bytes instead of encoding them again);
- the connection is always read (by a task of the event loop), so the server, which
  writes to every member of a room while holding its one lock, never blocks on us.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from typing import Any

import orjson

from processor.config import Config

from ._core import Body, ClientError, Receiver, decode_body, encode_json

QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0


def frame(body: bytes, header_length: int) -> bytes:
    header = str(len(body)).encode().ljust(header_length)
    if len(header) > header_length:
        raise ValueError(f"a body of {len(body)} bytes does not fit a {header_length}-byte "
                         "header")
    return header + body


class AsyncSwergioLink:
    kind = "swergio"

    def __init__(self, cfg: Config, name: str) -> None:
        self.cfg = cfg.transport.swergio
        self.name = name
        self.rooms: set[str] = set()    # joined on the server
        self.wanted: set[str] = set()   # joined to be read (not only to send there)
        self.logits = cfg.topics.logits
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    def _frame(self, obj: dict[str, Any]) -> bytes:
        return frame(orjson.dumps(obj), self.cfg.header_length)

    def _command(self, kind: str, **fields: Any) -> bytes:
        return self._frame({"ID": uuid.uuid4().hex, "TYPE": f"COMMAND/{kind}",
                            "TO_ROOM": "_command", **fields})

    async def open(self, receiver: Receiver) -> None:
        c = self.cfg
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(c.host, c.port),
                                                    CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as e:
            raise ClientError(f"no swergio server at {c.host}:{c.port} ({e!r})") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if QUICKACK is not None:  # the first header too (see the module's docstring)
                sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
        self._writer = writer
        self.rooms.add("_command")
        writer.write(self._command("REGISTER", NAME=self.name)
                     + self._command("JOINROOM", ROOM="_command"))
        await writer.drain()
        self._reader = asyncio.create_task(
            self._read(reader, receiver, sock if QUICKACK is not None else None),
            name="swarm-client-swergio")

    async def _read(self, reader: asyncio.StreamReader, receiver: Receiver,
                    quickack: Any) -> None:
        hl = self.cfg.header_length
        try:
            while True:
                header = await reader.readexactly(hl)
                if quickack is not None:
                    quickack.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
                text = header.strip()
                if not text.isdigit():
                    raise ClientError(f"swergio frame header is not a length: {header!r}")
                body = await reader.readexactly(int(text))
                if self.logits not in self.wanted and b'"LOGITS"' in body:
                    continue  # other models' logits, in the room a model must join to send
                obj = decode_body(body)
                if not isinstance(obj, dict) or obj.get("TYPE") != "DATA/CUSTOM":
                    continue
                room = obj.get("TO_ROOM")
                if isinstance(room, str) and room in self.wanted:
                    receiver.deliver(room, obj)
        except asyncio.CancelledError:
            raise
        except asyncio.IncompleteReadError:
            self.error = ClientError("the swergio server closed the connection")
        except (OSError, ClientError) as e:
            self.error = e if isinstance(e, ClientError) else ClientError(
                f"swergio connection lost ({e!r})")
        receiver.lost(self.error)

    def _write(self, data: bytes) -> asyncio.StreamWriter:
        w = self._writer
        if self.error is not None:
            raise self.error
        if w is None or w.is_closing():
            raise ClientError("the swergio connection is closed")
        w.write(data)
        return w

    async def join(self, topic: str) -> None:
        """Read this room's messages from now on."""
        await self._enter(topic)
        self.wanted.add(topic)

    async def _enter(self, room: str) -> None:
        if room not in self.rooms:
            self.rooms.add(room)
            await self._write(self._command("JOINROOM", ROOM=room)).drain()

    def _stamp(self, topic: str, obj: dict[str, Any]) -> dict[str, Any]:
        return {"ID": uuid.uuid4().hex, "TYPE": "DATA/CUSTOM", "SENT_BY": self.name, **obj,
                "TO_ROOM": topic}

    async def publish(self, topic: str, body: Body) -> None:
        await self._enter(topic)  # the room must exist before anyone sends to it
        if isinstance(body, dict):
            data = frame(encode_json(self._stamp(topic, body)), self.cfg.header_length)
        elif isinstance(body, (bytes, bytearray, memoryview)):
            data = frame(bytes(body), self.cfg.header_length)
        else:
            raise ClientError("swergio carries one JSON body per message, not frames")
        await self._write(data).drain()

    async def send_logits(self, topic: str, msg: dict[str, Any], key: tuple[Any, ...],
                          binary: bool) -> None:
        # swergio frames are JSON: binary float32 logits travel as JSON numbers here.
        await self.publish(topic, msg)

    async def close(self) -> None:
        w = self._writer
        if w is not None and not w.is_closing() and self.error is None:
            with contextlib.suppress(OSError, TimeoutError):
                w.write(self._command("DISCONNECT"))
                await asyncio.wait_for(w.drain(), CLOSE_TIMEOUT_S)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if w is not None:
            w.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(w.wait_closed(), CLOSE_TIMEOUT_S)
