"""The peers' side of the ZeroMQ transport: a PUB towards the worker, a SUB from it.

Guarantees: those of ZeroMQ PUB/SUB, at-most-once. Messages sent before the connection and
the subscription are up are dropped (the "slow joiner"): `Swarm.ready()` asks the worker
for a PEEK until it answers, after which both directions are up. Past the high-water marks
(`transport.zmq.sndhwm` / `rcvhwm`, as the worker's) ZeroMQ drops silently. One publisher's
messages arrive in order. The sockets connect where the worker binds; behind
`swarm-aggregator proxy` (the worker's sockets connect too) they connect to the proxy's
other side, so peers can also talk to each other there (observations, weights).

Subscriptions are prefix matches in ZeroMQ; a message whose topic is not exactly one this
link joined is dropped here. A sync link is used from one thread at a time (ZeroMQ sockets
are not thread-safe); it reads only while its owner waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio

from processor.config import Config

from ._core import Body, Receiver, decode_body, encode_json, packed_body

LINGER_MS = 1000   # on close, what is still queued gets this long to leave
MAX_BURST = 4096   # messages taken from the socket in one receive


def endpoints(cfg: Config) -> tuple[str, str]:
    """Where the peers publish and where they subscribe, from the worker's config.

    A worker that binds is reached at its own addresses; a worker that connects (behind
    `swarm-aggregator proxy`) connects its SUB to the proxy's XPUB and its PUB to the
    proxy's XSUB, so peers take the other two: they publish into the XSUB and read the XPUB.
    """
    z = cfg.transport.zmq
    publish_to = z.sub if z.sub_bind else z.pub
    subscribe_to = z.pub if z.pub_bind else z.sub
    return publish_to, subscribe_to


def curve_options(socket: zmq.Socket[Any], curve: tuple[bytes, bytes, bytes] | None) -> None:
    if curve is not None:
        socket.curve_publickey, socket.curve_secretkey, socket.curve_serverkey = curve


def frames_of(topic: str, body: Body) -> list[bytes]:
    t = topic.encode()
    if isinstance(body, dict):
        return [t, encode_json(body)]
    if isinstance(body, (bytes, bytearray, memoryview)):
        return [t, bytes(body)]
    return [t, *body]


def logits_frames(topic: str, msg: dict[str, Any], binary: bool) -> list[bytes]:
    if binary:
        return [topic.encode(), packed_body(msg)]
    return [topic.encode(), encode_json(msg)]


def decode(frames: Sequence[bytes], joined: set[bytes]) -> tuple[str, Any] | None:
    if len(frames) < 2 or frames[0] not in joined:
        return None
    topic = frames[0].decode()
    if len(frames) == 2:
        return topic, decode_body(frames[1])
    return topic, tuple(frames[1:])


class ZmqLink:
    """Blocking sockets, read in the caller's thread when it waits."""

    kind = "zmq"

    def __init__(self, cfg: Config, endpoints_: tuple[str, str] | None = None,
                 curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        z = cfg.transport.zmq
        self.publish_to, self.subscribe_to = endpoints_ or endpoints(cfg)
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.sub = self.ctx.socket(zmq.SUB)
        self.joined: set[bytes] = set()
        try:
            self.pub.setsockopt(zmq.SNDHWM, z.sndhwm)
            self.sub.setsockopt(zmq.RCVHWM, z.rcvhwm)
            for s in (self.pub, self.sub):
                s.setsockopt(zmq.LINGER, LINGER_MS)
                curve_options(s, curve)
            self.pub.connect(self.publish_to)
            self.sub.connect(self.subscribe_to)
        except BaseException:
            self.close(0)
            raise

    def join(self, topic: str) -> None:
        t = topic.encode()
        if t not in self.joined:
            self.joined.add(t)
            self.sub.setsockopt(zmq.SUBSCRIBE, t)

    def publish(self, topic: str, body: Body) -> None:
        self.pub.send_multipart(frames_of(topic, body))

    def send_logits(self, topic: str, msg: dict[str, Any], key: tuple[Any, ...],
                    binary: bool) -> None:
        self.pub.send_multipart(logits_frames(topic, msg, binary))

    def receive(self, timeout: float) -> list[tuple[str, Any]]:
        sub = self.sub
        if not sub.poll(max(0, int(timeout * 1000))):
            return []
        out = []
        joined = self.joined
        for _ in range(MAX_BURST):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            got = decode(frames, joined)
            if got is not None:
                out.append(got)
        return out

    def close(self, linger: int | None = None) -> None:
        ms = LINGER_MS if linger is None else linger
        self.pub.close(ms)
        self.sub.close(0)
        self.ctx.term()


class AsyncZmqLink:
    """zmq.asyncio sockets; a reader task hands every message to the receiver."""

    kind = "zmq"

    def __init__(self, cfg: Config, endpoints_: tuple[str, str] | None = None,
                 curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self.cfg = cfg
        self.publish_to, self.subscribe_to = endpoints_ or endpoints(cfg)
        self.curve = curve
        self.joined: set[bytes] = set()
        self._reader: asyncio.Task[None] | None = None

    async def open(self, receiver: Receiver) -> None:
        z = self.cfg.transport.zmq
        # Made here, in the loop that uses them, not where the swarm object was made.
        self.ctx = zmq.asyncio.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.sub = self.ctx.socket(zmq.SUB)
        try:
            self.pub.setsockopt(zmq.SNDHWM, z.sndhwm)
            self.sub.setsockopt(zmq.RCVHWM, z.rcvhwm)
            for s in (self.pub, self.sub):
                s.setsockopt(zmq.LINGER, LINGER_MS)
                curve_options(s, self.curve)
            self.pub.connect(self.publish_to)
            self.sub.connect(self.subscribe_to)
        except BaseException:
            await self.close()
            raise
        self._reader = asyncio.create_task(self._read(receiver), name="swarm-client-zmq")

    async def _read(self, receiver: Receiver) -> None:
        while True:
            frames = await self.sub.recv_multipart()
            got = decode(frames, self.joined)
            if got is not None:
                receiver.deliver(*got)

    async def join(self, topic: str) -> None:
        t = topic.encode()
        if t not in self.joined:
            self.joined.add(t)
            self.sub.setsockopt(zmq.SUBSCRIBE, t)

    async def publish(self, topic: str, body: Body) -> None:
        await self.pub.send_multipart(frames_of(topic, body))

    async def send_logits(self, topic: str, msg: dict[str, Any], key: tuple[Any, ...],
                          binary: bool) -> None:
        await self.pub.send_multipart(logits_frames(topic, msg, binary))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, zmq.ZMQError):
                await self._reader
        self.pub.close(LINGER_MS)
        self.sub.close(0)
        # term() waits out the linger: in a thread, so the loop goes on meanwhile.
        await asyncio.to_thread(self.ctx.term)
