"""`FastClient`: nats-py's client, with hot subscriptions handled synchronously.

Used by the worker's transport (deliveries, PubAcks of actions, evolution commands) and by
the peers' library (`processor.client`: PubAcks of logits, actions, evolution replies).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from nats import errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

# A message as a direct handler gets it: subject, reply, payload, raw headers (the bytes
# from "NATS/1.0" to the blank line, None without headers).
Handler = Callable[[bytes, bytes, bytes, bytes | None], None]

_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def header_value(value: str) -> bytes:
    """A header value as it may go on the wire: its line breaks made spaces, so that no
    value (a step key, a component id) can end its header line and add another."""
    return value.strip().translate(_NEWLINES).encode()


class FastClient(Client):
    """nats-py's client, with chosen subscriptions handled synchronously.

    nats-py makes every message a Msg, parses its headers, queues it and wakes a task that
    awaits the callback: for messages that come once per step, that costs more CPU than
    the rest of the step. A subscription made `direct` hands the parser's bytes straight to
    a plain function (which must not raise: it runs in the connection's read loop; its
    messages are not counted in `stats`). Everything else (connecting, reconnecting and
    subscribing again with the same sids, so direct routing survives a reconnect;
    requests, the JetStream API) stays nats-py's. `write` queues raw protocol bytes (an
    HPUB, a batch of PUBs) and wakes the flusher once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, Handler] = {}
        self._ps = _Parser(self)

    def direct(self, sub: Subscription, handler: Handler) -> None:
        """Hand `sub`'s messages to `handler`, in the read loop, from now on."""
        self._direct[sub._id] = handler

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None) -> None:
        handler = self._direct.get(sid)  # (_Parser calls it itself)
        if handler is None:
            # nats-py's own path; it takes headers=None as "no headers" (its type says bytes)
            await super()._process_msg(sid, subject, reply, data, cast(bytes, headers))
            return
        handler(subject, reply, data, headers)

    def write(self, cmd: bytes, flush: bool = True) -> None:
        """Queue protocol bytes (kept across a reconnect, as publish does); flush soon, or
        (flush=False) with whatever is written next.

        Raises OutboundBufferLimitError while disconnected with the buffer full."""
        if not self.is_connected and (self._max_pending_size <= 0 or len(cmd)
                                      + self._pending_data_size > self._max_pending_size):
            raise errors.OutboundBufferLimitError
        self._pending.append(cmd)
        self._pending_data_size += len(cmd)
        if flush:
            self.kick()

    def kick(self) -> None:
        """Have the flusher write what is queued."""
        queue = self._flush_queue
        if (self.is_connected and queue is not None and queue.empty()
                and self._flusher_task is not None and not self._flusher_task.done()):
            queue.put_nowait(asyncio.get_running_loop().create_future())


class _Parser(Parser):
    """nats-py's parser, with MSG and HMSG read by splitting their line (no regex) and the
    buffer cut once per read rather than once per message (one cut by the read waits for
    the rest); whatever else comes (INFO, PING, -ERR) goes on to nats-py's own parse."""

    _wait = 0  # bytes the buffer needs before a message is complete (one spans reads)

    def __init__(self, nc: FastClient) -> None:
        super().__init__(nc)
        self.fast = nc

    def reset(self) -> None:
        super().reset()
        self._wait = 0

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        if self.state != AWAITING_CONTROL_LINE:  # nats-py's parse is in a message
            await super().parse()
            return
        if len(buf) < self._wait:
            return  # a large message still coming: not copied again at every read
        self._wait = 0
        raw = bytes(buf)  # one copy per read; then each message is one slice of it
        pos, size = 0, len(raw)
        nc = self.fast
        direct = nc._direct
        other = False
        while pos < size:
            if raw.startswith(b"HMSG ", pos):
                headers = 1
            elif raw.startswith(b"MSG ", pos):
                headers = 0
            else:
                other = True
                break
            end = raw.find(b"\r\n", pos)
            if end < 0:
                break  # not all here yet
            # [H]MSG <subject> <sid> [<reply>] [<header bytes>] <total bytes>
            args = raw[pos:end].split()
            n = len(args) - headers  # 5 with a reply subject, 4 without
            if (n not in (4, 5) or not args[2].isdigit() or not args[-1].isdigit()
                    or (headers and not args[-2].isdigit())):
                other = True  # malformed: nats-py's parse says so
                break
            hlen = int(args[-2]) if headers else 0
            start = end + 2
            stop = start + int(args[-1])
            if size < stop + 2:
                self._wait = stop + 2 - pos  # counted from where the buffer will start
                break
            pos = stop + 2
            sid = int(args[2])
            reply = args[3] if n == 5 else b""
            head = raw[start:start + hlen] if hlen else None
            handler = direct.get(sid)
            if handler is not None:
                handler(args[1], reply, raw[start + hlen:stop], head)
            else:
                await nc._process_msg(sid, args[1], reply, raw[start + hlen:stop], head)
        if pos:
            del buf[:pos]
        if other:
            await super().parse()
