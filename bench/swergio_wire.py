"""The swergio 0.0.2 wire protocol, spoken with plain blocking sockets.

A frame is a header of 10 bytes holding the body's length in ASCII, left-justified and
space-padded, then the UTF-8 JSON body. A connection announces itself with
`COMMAND/REGISTER` (its NAME) and joins rooms with `COMMAND/JOINROOM`, each sent to the
room `_command`. The server must know a connection's NAME before it forwards anything
from it, and a room must exist (someone joined it) before anyone sends to it.

QUICKACK: the server writes each frame it forwards as two writes (header, then body) on
sockets with Nagle's algorithm on, so the body waits until the header is acknowledged. A
reader that answers at once (a component replying as soon as its window is full) makes
Linux treat the connection as interactive and delay its acknowledgements (by 40 ms) to
piggyback them on the answer: one or two such stalls per step. `quickack=True` asks for an
immediate acknowledgement before every read (TCP_QUICKACK, Linux), which removes the stall.

Written from the protocol, independently of the worker's transport, so that a framing
mistake on either side shows up as a failed run rather than cancelling out.
"""

from __future__ import annotations

import socket
import time
import uuid
from typing import Any

import orjson

HEADER = 10


def frame(body: bytes) -> bytes:
    return str(len(body)).encode().ljust(HEADER) + body


def encode(obj: dict[str, Any]) -> bytes:
    return frame(orjson.dumps(obj))


def data(room: str, sender: str, **fields: Any) -> dict[str, Any]:
    """A DATA/CUSTOM message as a swergio component sends it (with ID and SENT_BY)."""
    return {"ID": uuid.uuid4().hex, "TYPE": "DATA/CUSTOM", "TO_ROOM": room,
            "SENT_BY": sender, **fields}


def command(kind: str, **fields: Any) -> bytes:
    return encode({"ID": uuid.uuid4().hex, "TYPE": f"COMMAND/{kind}", "TO_ROOM": "_command",
                   **fields})


class Connection:
    """One registered connection to the server, with frame-wise reading."""

    def __init__(self, host: str, port: int, name: str, rooms: tuple[str, ...] = (),
                 timeout: float = 10.0, quickack: bool = False) -> None:
        self.sock = socket.create_connection((host, port), timeout)
        self.quickack = quickack and hasattr(socket, "TCP_QUICKACK")
        # One write per frame and no Nagle delay on our side (the server's side is its own).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        hello = [command("REGISTER", NAME=name)]
        hello += [command("JOINROOM", ROOM=room) for room in rooms]
        self.sock.sendall(b"".join(hello))

    def send(self, framed: bytes) -> None:
        self.sock.sendall(framed)

    def recv(self) -> bytes:
        """The next frame's body; socket.timeout after the socket's timeout."""
        buf = self.buf
        while True:
            if len(buf) >= HEADER:
                n = int(buf[:HEADER])
                end = HEADER + n
                if len(buf) >= end:
                    body = bytes(buf[HEADER:end])
                    del buf[:end]
                    return body
            if self.quickack:
                # Linux clears it by itself: re-armed before every read (see QUICKACK).
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the swergio server closed the connection")
            buf += chunk

    def close(self) -> None:
        try:
            self.sock.sendall(command("DISCONNECT"))
        except OSError:
            pass
        self.sock.close()


def wait_server(host: str, port: int, timeout: float) -> bool:
    """Connect until the server accepts; leave cleanly (REGISTER, DISCONNECT)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), 1.0) as s:
                s.sendall(command("REGISTER", NAME="bench-probe") + command("DISCONNECT"))
                return True
        except OSError:
            time.sleep(0.02)
    return False
