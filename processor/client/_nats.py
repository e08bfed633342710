"""The peers' side of the NATS JetStream transport.

Guarantees
- Logits: stored once. Each goes by JetStream publish to `logits.<token>` (token: the
  first step-key value, made one subject token) and counts as sent only when its PubAck is
  back. Without a PubAck in time it is sent again, with the same
  `Nats-Msg-Id: <COMPONENT_ID>|<key values joined by |>`, so a retry after a lost PubAck is
  not stored twice (the stream de-duplicates within its duplicate window). All messages of
  one window share the token, so they reach the same partition and worker.
- Actions: read live on `action.>` (core NATS, at-most-once while connected); the stream
  republishes each stored action once.
- Evolution: core NATS; every worker answers with its share, tagged with its PARTITIONS;
  the swarm merges them (`processor.ledger.merge_replies`).
- Plain publish/subscribe: core NATS subjects, at-most-once. A connection does not hear
  itself (no_echo), as on swergio.
nats-py reconnects by itself; while it does, sends wait and are retried until their timeout.

The connection is `transports.nats.FastClient`: the PubAcks, actions and evolution replies
(once per step) go straight from its read loop to plain functions, and a logits message is
one HPUB written as bytes, each with a reply subject of its own under one PubAck inbox,
rather than nats-py's Msg, header parsing, callback task and future per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import nats
import orjson
from nats.js import JetStreamContext

from processor.config import Config
from transports.nats import FastClient, connect_options, header_value, subject_token

from ._core import (
    Body,
    ClientError,
    NoReply,
    Receiver,
    decode_body,
    encode_json,
    packed_body,
)

log = logging.getLogger("swarm_aggregator.client")

ATTEMPT_S = 2.0      # one JetStream publish waits this long for its PubAck
SEND_TIMEOUT_S = 60.0  # then it is sent again, until this long has passed
FLUSH_S = 5


def msg_id(model_id: str, key: tuple[Any, ...]) -> str:
    """The de-duplication id of one model's logits for one step key."""
    return "|".join([model_id, *map(str, key)])


async def _acked(ack: asyncio.Future[Any], timeout: float) -> bool:
    """Await a PubAck; False when none came within `timeout` (the future is cancelled).

    A timer rather than wait_for, which costs a task's worth of work per message."""
    timer = asyncio.get_running_loop().call_later(timeout, ack.cancel)
    try:
        await ack
        return True
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # our caller's cancellation, not the timer's
        return False
    finally:
        timer.cancel()


class AsyncNatsLink:
    kind = "nats"

    def __init__(self, cfg: Config, name: str, send_timeout: float = SEND_TIMEOUT_S) -> None:
        self.cfg = cfg
        self.name = name
        self.send_timeout = send_timeout
        self.t_action = cfg.topics.action
        self.nc: FastClient | None = None
        self.js: JetStreamContext | None = None
        self.joined: set[str] = set()
        self.receiver: Receiver | None = None
        self._acks: dict[int, asyncio.Future[None]] = {}  # logits awaiting their PubAck
        self._pids = 0
        self._ack_prefix = b""  # the PubAck inbox; a logits message's reply is <prefix><id>
        self._head = b""  # the headers every logits message carries, up to its Nats-Msg-Id

    async def open(self, receiver: Receiver) -> None:
        n = self.cfg.transport.nats
        self.receiver = receiver
        options = connect_options(n, self.name)

        async def quiet(e: Exception) -> None:  # reconnects are nats-py's business
            log.debug("nats: %r", e)

        async def closed() -> None:
            self._fail_acks()
            if self.receiver is not None:
                self.receiver.lost(ClientError("the NATS connection is closed"))

        options.update(no_echo=True, error_cb=quiet, closed_cb=closed,
                       reconnect_time_wait=min(n.reconnect_wait_s, 0.5))
        nc = FastClient()
        try:
            await asyncio.wait_for(nc.connect(**options), max(n.connect_wait_s, 2.0))
        except (OSError, TimeoutError, nats.errors.Error) as e:
            raise ClientError(f"no NATS server answered at {', '.join(n.servers)} "
                              f"({e!r})") from None
        self.nc = nc
        self.js = nc.jetstream()
        # One subscription for every PubAck (nats-py subscribes it again on a reconnect).
        inbox = nc.new_inbox()
        sub = await nc.subscribe(f"{inbox}.*")
        nc.direct(sub, self._on_puback)
        self._ack_prefix = f"{inbox}.".encode()
        # What js.publish(stream=...) sends: stored by that stream or refused.
        self._head = f"NATS/1.0\r\nNats-Expected-Stream: {n.stream}\r\n".encode()

    def _on_puback(self, subject: bytes, reply: bytes, data: bytes,
                   headers: bytes | None) -> None:
        """A PubAck (or the stream's refusal) for the logits message with this id."""
        try:
            pid = int(subject.rsplit(b".", 1)[1])
        except (IndexError, ValueError):
            return
        ack = self._acks.get(pid)
        if ack is None or ack.done():
            return  # a late answer to an earlier send: the first one's came already
        if not data:  # a status: 503, no stream takes the subject or it has no leader
            ack.set_exception(nats.errors.Error(
                f"not stored: {(headers or b'no answer').splitlines()[0]!r}"))
            return
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict) or "error" in answer or "stream" not in answer:
            # {"error": {...}} from the stream (say, another stream than expected): not stored
            ack.set_exception(nats.errors.Error(f"not stored: {data[:200]!r}"))
            return
        ack.set_result(None)

    def _fail_acks(self) -> None:
        """Wake every send awaiting a PubAck (the connection is closed): it says so."""
        for ack in self._acks.values():
            if not ack.done():
                ack.set_exception(nats.errors.ConnectionClosedError())

    def _conn(self) -> FastClient:
        if self.nc is None or self.nc.is_closed:
            raise ClientError("the NATS connection is closed")
        return self.nc

    async def join(self, topic: str) -> None:
        if topic in self.joined:
            return
        nc = self._conn()
        self.joined.add(topic)
        subject = f"{topic}.>" if topic == self.t_action else topic

        def on_msg(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
            # In the connection's read loop: must not raise (nats-py would have handed the
            # error of a callback to error_cb).
            if self.receiver is not None:
                try:
                    self.receiver.deliver(topic, decode_body(data))
                except Exception:  # noqa: BLE001 - one message, not the connection
                    log.exception("nats: delivering a message of %s", topic)

        sub = await nc.subscribe(subject)
        nc.direct(sub, on_msg)
        # Only once the server has the subscription does it forward what follows.
        await nc.flush(FLUSH_S)

    async def publish(self, topic: str, body: Body) -> None:
        if topic == self.cfg.topics.logits:
            raise ClientError("on NATS, logits go through Model.send (JetStream, one "
                              "subject per step key)")
        if isinstance(body, dict):
            data = encode_json(body)
        elif isinstance(body, (bytes, bytearray, memoryview)):
            data = bytes(body)
        else:
            raise ClientError("NATS carries one payload per message, not frames")
        await self._conn().publish(topic, data)

    async def send_logits(self, topic: str, msg: dict[str, Any], key: tuple[Any, ...],
                          binary: bool) -> None:
        nc = self._conn()
        subject = subject_token(str(key[0])).encode()
        mid = msg_id(str(msg["COMPONENT_ID"]), key)
        data = packed_body(msg) if binary else encode_json(msg)  # (the payload, as it is)
        self._pids += 1
        pid = self._pids
        # A line break in the id (a key value, COMPONENT_ID) is a space: no header added.
        head = self._head + b"Nats-Msg-Id: %s\r\n\r\n" % header_value(mid)
        # Every send, first or again, the same bytes: same Nats-Msg-Id, same reply subject.
        wire = b"HPUB %s.%s %s%d %d %d\r\n%s%s\r\n" % (
            topic.encode(), subject, self._ack_prefix, pid, len(head), len(head) + len(data),
            head, data)
        loop = asyncio.get_running_loop()
        end = time.monotonic() + self.send_timeout
        delay = 0.05
        while True:
            try:
                if nc.is_closed:
                    raise nats.errors.ConnectionClosedError
                ack: asyncio.Future[None] = loop.create_future()
                self._acks[pid] = ack
                try:
                    nc.write(wire)
                    if await _acked(ack, ATTEMPT_S):
                        return
                finally:
                    del self._acks[pid]
                raise TimeoutError("no PubAck")
            except (nats.errors.Error, OSError, TimeoutError) as e:
                # No PubAck (lost, or the stream has no leader or does not exist yet):
                # the same Nats-Msg-Id again, so a stored first copy stays the only one.
                if nc.is_closed:
                    raise ClientError("the NATS connection is closed") from None
                if time.monotonic() + delay > end:
                    raise NoReply(f"logits of {mid} not stored within "
                                  f"{self.send_timeout:g} s ({e!r})") from None
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)

    async def close(self) -> None:
        nc, self.nc = self.nc, None
        self.receiver = None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):  # closing anyway
                await asyncio.wait_for(nc.flush(FLUSH_S), FLUSH_S)
            await nc.close()
        self._fail_acks()  # sends still waiting: the connection is closed
