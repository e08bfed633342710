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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from processor.config import Config
from transports.nats import connect_options, subject_token

from ._core import Body, ClientError, NoReply, Receiver, decode_body, encode_json

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
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.joined: set[str] = set()
        self.receiver: Receiver | None = None

    async def open(self, receiver: Receiver) -> None:
        n = self.cfg.transport.nats
        self.receiver = receiver
        options = connect_options(n, self.name)

        async def quiet(e: Exception) -> None:  # reconnects are nats-py's business
            log.debug("nats: %r", e)

        async def closed() -> None:
            if self.receiver is not None:
                self.receiver.lost(ClientError("the NATS connection is closed"))

        options.update(no_echo=True, error_cb=quiet, closed_cb=closed,
                       reconnect_time_wait=min(n.reconnect_wait_s, 0.5))
        try:
            self.nc = await asyncio.wait_for(nats.connect(**options),
                                             max(n.connect_wait_s, 2.0))
        except (OSError, TimeoutError, nats.errors.Error) as e:
            raise ClientError(f"no NATS server answered at {', '.join(n.servers)} "
                              f"({e!r})") from None
        self.js = self.nc.jetstream()

    def _conn(self) -> Client:
        if self.nc is None or self.nc.is_closed:
            raise ClientError("the NATS connection is closed")
        return self.nc

    async def join(self, topic: str) -> None:
        if topic in self.joined:
            return
        nc = self._conn()
        self.joined.add(topic)
        subject = f"{topic}.>" if topic == self.t_action else topic

        async def on_msg(msg: Msg) -> None:
            if self.receiver is not None:
                self.receiver.deliver(topic, decode_body(msg.data))

        await nc.subscribe(subject, cb=on_msg, pending_msgs_limit=1_000_000)
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
        # The worker's NATS intake takes JSON: binary float32 logits travel as JSON here.
        nc = self._conn()
        js = self.js
        assert js is not None
        subject = f"{topic}.{subject_token(str(key[0]))}"
        mid = msg_id(str(msg["COMPONENT_ID"]), key)
        data = encode_json(msg)
        stream = self.cfg.transport.nats.stream
        end = time.monotonic() + self.send_timeout
        delay = 0.05
        while True:
            try:
                # publish_async: one shared reply subscription for every PubAck, where
                # js.publish would make a request (and an inbox future) of each message.
                ack = await js.publish_async(subject, data, headers={"Nats-Msg-Id": mid},
                                             stream=stream)
                if await _acked(ack, ATTEMPT_S):
                    return
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
