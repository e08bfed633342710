"""ZeroMQ transport: a SUB socket in (logits, evolution), a PUB socket out (actions, replies).

Binary logits (the message without LOGITS as a JSON header, plus `"SHAPE": [B, A]` for a
batch, and the values as little-endian float32: no text to parse or convert) come packed in
the frame after the topic (`processor.messages.pack`, read by the decoder like any payload),
or as three frames, `[topic, JSON header, values]`, which this transport joins.

Guarantees (ZeroMQ PUB/SUB): at-most-once; per-publisher order is kept; a message sent
before the subscription reached the publisher is lost (the "slow joiner"); when a
subscriber's queue holds `rcvhwm` messages, further ones are dropped by ZeroMQ without
notice to either side. Each message is two frames, `[topic, JSON payload]`; the topic frame
must equal a configured topic exactly (ZeroMQ's subscription is a prefix match).
Each socket binds or connects by config; bind to loopback unless told otherwise.

Waiting: once the queue is empty, the worker keeps asking the socket for up to `spin_us`
(200 µs by default) before it sleeps, but only while most of its last 16 waits for a
message were that short: in a lockstep loop the next window begins within a round trip of
the action, and a thread that sleeps takes tens of microseconds more to wake than a message
takes to cross loopback. When the gaps are longer (an environment step of milliseconds, an
idle bus) it stops spinning after a few of them, so an idle worker burns nothing; `spin_us
= 0` never spins.

Security: with `curve_secret_file` set, both sockets speak CurveZMQ. A socket that binds
is a CURVE server and lets in only peers whose public certificate lies in
`curve_clients_dir` (ZeroMQ's ZAP handshake refuses the rest before any message flows); a
socket that connects is a CURVE client of the server named by `curve_server_public_file`.
Certificates come from `swarm-aggregator keys`. Without CURVE, traffic is plain TCP.
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import zmq

from processor.config import Config
from processor.errors import ConfigError

from .base import Envelope, RejectHook

Socket = zmq.Socket[bytes]


# Messages per receive at most (below base.MAX_BURST). The actions of a burst go out once
# all of it is decoded, so on a busy queue a smaller burst lets the environments and models
# work while the worker does, instead of waiting for thousands of messages at a time; still
# large enough (about 25 windows of 20 models) that aggregation and the books run for many
# windows at once.
BURST = 512
SPIN_MEMORY = 16  # recent waits for a message that decide whether to spin
_MORE = zmq.SNDMORE | zmq.NOBLOCK


class ZmqTransport:
    acks = False

    def __init__(self, cfg: Config, on_reject: RejectHook,
                 context: zmq.Context[Socket] | None = None) -> None:
        self.cfg = cfg.transport.zmq
        self.topics = {cfg.topics.logits.encode(): cfg.topics.logits,
                       cfg.topics.evolution.encode(): cfg.topics.evolution}
        self.logits_topic = cfg.topics.logits
        self.max_bytes = cfg.limits.max_message_bytes
        self.on_reject = on_reject
        self.ctx = context or zmq.Context.instance()
        self.ready = False
        self.sub_endpoint = ""
        self.pub_endpoint = ""
        self._sub: Socket | None = None
        self._pub: Socket | None = None
        self._readable = asyncio.Event()
        self._auth: Any = None
        # Wait up to this long inside ZeroMQ's own poll before going back to the event loop:
        # the next message of a window usually follows within microseconds, and a trip
        # through the loop costs more than that. Only this transport's socket is served
        # meanwhile (the metrics server has its own thread).
        self.spin_ms = 1
        self.spin_s = self.cfg.spin_us / 1e6
        self._waits: collections.deque[bool] = collections.deque(maxlen=SPIN_MEMORY)
        self._short = 0  # recent waits within spin_s

    async def __aenter__(self) -> Self:
        c = self.cfg
        sub = self.ctx.socket(zmq.SUB)
        pub = self.ctx.socket(zmq.PUB)
        for s in (sub, pub):
            s.setsockopt(zmq.LINGER, 500)
        sub.setsockopt(zmq.RCVHWM, c.rcvhwm)
        # Up to 4x the limit a message reaches Python and is counted as too_large; past that
        # ZeroMQ refuses it while reading and drops the sender's connection (the sender
        # reconnects by itself), so no peer can make the worker hold a huge frame.
        sub.setsockopt(zmq.MAXMSGSIZE, 4 * self.max_bytes + (1 << 20))
        pub.setsockopt(zmq.SNDHWM, c.sndhwm)
        for topic in self.topics:
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        if c.curve_secret_file:
            try:
                self._curve(sub, c.sub_bind)
                self._curve(pub, c.pub_bind)
            except BaseException:
                sub.close(0)
                pub.close(0)
                raise
        try:
            self.sub_endpoint = _attach(sub, c.sub, c.sub_bind, "transport.zmq.sub")
            self.pub_endpoint = _attach(pub, c.pub, c.pub_bind, "transport.zmq.pub")
        except BaseException:
            sub.close(0)
            pub.close(0)
            raise
        self._sub, self._pub = sub, pub
        # ZeroMQ's FD is edge-triggered: it says "look at EVENTS", not "a message waits".
        asyncio.get_running_loop().add_reader(sub.FD, self._readable.set)
        self.ready = True
        return self

    def _curve(self, sock: Socket, server: bool) -> None:
        c = self.cfg
        public, secret = _certificate(c.curve_secret_file, "transport.zmq.curve_secret_file")
        if secret is None:
            raise ConfigError("transport.zmq.curve_secret_file", "holds no secret key")
        sock.curve_publickey, sock.curve_secretkey = public, secret
        if server:
            if self._auth is None:
                if not Path(c.curve_clients_dir).is_dir():
                    raise ConfigError("transport.zmq.curve_clients_dir",
                                      f"not a folder: {c.curve_clients_dir!r}")
                from zmq.auth.thread import ThreadAuthenticator

                self._auth = ThreadAuthenticator(self.ctx)
                self._auth.start()
                self._auth.configure_curve(domain="*", location=c.curve_clients_dir)
            sock.curve_server = True
        else:
            server_key, _ = _certificate(c.curve_server_public_file,
                                         "transport.zmq.curve_server_public_file")
            sock.curve_serverkey = server_key

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.ready = False
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._sub is not None:
            asyncio.get_running_loop().remove_reader(self._sub.FD)
            self._sub.close()
        if self._pub is not None:
            self._pub.close()
        self._sub = self._pub = None

    async def receive(self, timeout: float | None) -> list[Envelope]:
        sub = self._sub
        assert sub is not None, "use 'async with transport'"
        # EVENTS first: a read that finds nothing raises, which costs more than asking.
        if _pollin(sub):
            return self._drain(sub)
        if timeout is not None and timeout <= 0:
            return await self._sleep(sub, 0)  # (through the event loop all the same)
        start = time.perf_counter()
        if self.spinning:
            # Most recent waits were short: ask again and again rather than sleep.
            end = start + (self.spin_s if timeout is None else min(self.spin_s, timeout))
            while time.perf_counter() < end:
                if _pollin(sub):
                    self._waited(True)
                    return self._drain(sub)
        batch = await self._sleep(sub, timeout)
        self._waited(bool(batch) and time.perf_counter() - start <= self.spin_s)
        return batch

    @property
    def spinning(self) -> bool:
        """Whether the next wait for a message polls before sleeping: spin_us is set and
        most of the last SPIN_MEMORY waits were within it (or there were none yet)."""
        return bool(self.spin_s) and 2 * self._short >= len(self._waits)

    def _waited(self, short: bool) -> None:
        """Remember whether a wait for a message was within spin_s (the last SPIN_MEMORY)."""
        waits = self._waits
        if len(waits) == SPIN_MEMORY:
            self._short -= waits[0]
        waits.append(short)
        self._short += short

    async def _sleep(self, sub: Socket, timeout: float | None) -> list[Envelope]:
        """Wait inside ZeroMQ's poll up to spin_ms, then in the event loop."""
        if sub.poll(self.spin_ms if timeout is None else int(min(self.spin_ms, timeout * 1e3))):
            return self._drain(sub)
        # Nothing within the spin: give the event loop back until the socket stirs.
        self._readable.clear()
        # Reading EVENTS re-arms the edge; a message may have come in between.
        if not _pollin(sub):
            try:
                async with asyncio.timeout(timeout):
                    await self._readable.wait()
            except TimeoutError:
                return []
        return self._drain(sub)

    def _drain(self, sub: Socket) -> list[Envelope]:
        """What is queued now, up to BURST messages, each checked for its frames.

        Frames are read one at a time without copies (`copy=False`: a frame object that
        knows whether more of its message follows), not with `recv_multipart`, which asks
        the socket for RCVMORE after every frame: that costs more than the parse of a short
        message. Every frame of a message is queued once its first is (ZeroMQ delivers
        messages whole), so a NOBLOCK read never stops inside one.
        """
        out: list[Envelope] = []
        recv = sub.recv
        topics = self.topics
        max_bytes = self.max_bytes
        logits = self.logits_topic
        now = time.monotonic()
        while len(out) < BURST:
            try:
                first = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            if not first.more:
                self._refuse(recv, topics.get(first.bytes), first, 1)
                continue
            frame = recv(zmq.NOBLOCK, copy=False)
            topic = topics.get(first.bytes)
            if frame.more:
                # [topic, JSON without LOGITS, float32 little-endian values]: binary logits
                values = recv(zmq.NOBLOCK, copy=False)
                if values.more or topic is not logits:
                    self._refuse(recv, topic, values, 3)
                    continue
                meta, data = frame.bytes, values.bytes
                size = len(meta) + len(data)
                if size > max_bytes:
                    self.on_reject("too_large", f"{size} bytes > {max_bytes}")
                    continue
                out.append((logits, (meta, data), now, None))
                continue
            # [topic, JSON]: the common case
            if topic is None:
                continue  # another topic that merely starts with ours (prefix match)
            body = frame.bytes
            if len(body) > max_bytes:
                self.on_reject("too_large", f"{len(body)} bytes > {max_bytes}")
                continue
            out.append((topic, body, now, None))
        return out

    def _refuse(self, recv: Any, topic: str | None, last: zmq.Frame, n: int) -> None:
        """A message of the wrong frame count (`n` read so far, `last` the latest): the
        rest of its frames read and dropped; counted when it was on one of our topics
        (a topic that merely starts with ours is someone else's)."""
        while last.more:
            last = recv(zmq.NOBLOCK, copy=False)
            n += 1
        if topic is not None:
            self.on_reject("bad_frame", f"{n} frame{'s' if n > 1 else ''} on topic {topic!r}")

    async def publish(self, topic: str, payload: bytes, dedup: str | None = None) -> bool:
        assert self._pub is not None, "use 'async with transport'"
        # PUB never blocks: at the high-water mark ZeroMQ drops for that subscriber. Two
        # sends rather than send_multipart, whose generic loop costs twice both of them.
        send = self._pub.send
        send(topic.encode(), _MORE)
        send(payload, zmq.NOBLOCK)
        return True

    async def settle(self, tokens: list[Any]) -> None:
        pass  # at-most-once: nothing to acknowledge

    def stamp(self, topic: str) -> dict[str, Any] | None:
        return None


def _pollin(sock: Socket) -> bool:
    return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


def _certificate(path: str, key: str) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"cannot read certificate {path!r}: {e}") from None
    return public, secret


def generate_keys(folder: str, name: str) -> tuple[str, str]:
    """A CURVE key pair in `folder`: NAME.key (public, to share) and NAME.key_secret."""
    import zmq.auth

    Path(folder).mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(folder, name)
    Path(secret).chmod(0o600)
    return str(public), str(secret)


def _attach(sock: Socket, endpoint: str, bind: bool, key: str) -> str:
    """Bind or connect; an address that cannot be used is the config's fault (its key)."""
    try:
        if bind:
            if endpoint.endswith((":0", ":*")):
                base = endpoint.rsplit(":", 1)[0]
                port = sock.bind_to_random_port(base)
                return f"{base}:{port}"
            sock.bind(endpoint)
            return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        sock.connect(endpoint)
        return endpoint
    except zmq.ZMQError as e:
        verb = "bind" if bind else "connect to"
        hint = " (another worker there?)" if e.errno == zmq.EADDRINUSE else ""
        why = zmq.strerror(e.errno) if e.errno is not None else str(e)
        raise ConfigError(key, f"cannot {verb} {endpoint}: {why}{hint}") from None
