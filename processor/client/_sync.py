"""The synchronous client: `with connect(cfg) as swarm:` and its roles.

ZeroMQ runs on blocking sockets read in the caller's thread, only while it waits: no other
thread touches them. swergio and NATS run their async link on an event loop in a thread
of the swarm's own (nats-py is async-only; a swergio connection must be read all the time,
or the server, which writes to a room under one lock, stalls on it). That thread alone
uses their sockets: `close()` closes them there, then stops and joins it.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar

from processor.config import Config, load

from ._async import AsyncLink, client_name, merger
from ._core import (
    DEFAULT_BUFFER,
    RETRY_S,
    Body,
    ClientError,
    Inbox,
    NoReply,
    Replies,
    StepKey,
    logits_message,
)

if TYPE_CHECKING:
    import zmq

T = TypeVar("T")
CLOSE_TIMEOUT_S = 15.0
FOREVER_SLICE_S = 1.0  # a wait without limit still looks at the link this often


def config_of(cfg: Config | str | os.PathLike[str] | None) -> Config:
    return cfg if isinstance(cfg, Config) else load(cfg)


class Link(Protocol):
    kind: str

    def join(self, topic: str) -> None: ...

    def publish(self, topic: str, body: Body) -> None: ...

    def send_logits(self, topic: str, msg: dict[str, Any], key: tuple[Any, ...],
                    binary: bool) -> None: ...

    def receive(self, timeout: float) -> list[tuple[str, Any]]: ...

    def close(self) -> None: ...


class Portal:
    """A sync Link over an async one whose event loop runs in a thread of its own."""

    def __init__(self, make: Callable[[], AsyncLink]) -> None:
        self._queue: queue.SimpleQueue[tuple[str, Any] | BaseException] = queue.SimpleQueue()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="swarm-client-loop")
        self._thread.start()
        self._link: AsyncLink | None = None
        try:
            self._link = self._call(self._open(make))
        except BaseException:
            self._stop()
            raise
        self.kind = self._link.kind

    async def _open(self, make: Callable[[], AsyncLink]) -> AsyncLink:
        link = make()  # made in the loop: its asyncio objects belong to it
        await link.open(self)
        return link

    # the Receiver, called in the loop's thread
    def deliver(self, topic: str, payload: Any) -> None:
        self._queue.put((topic, payload))

    def lost(self, error: BaseException) -> None:
        self._queue.put(error)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _linked(self) -> AsyncLink:
        if self._link is None:
            raise ClientError("the swarm is closed")
        return self._link

    def join(self, topic: str) -> None:
        self._call(self._linked().join(topic))

    def publish(self, topic: str, body: Body) -> None:
        self._call(self._linked().publish(topic, body))

    def send_logits(self, topic: str, msg: dict[str, Any], key: tuple[Any, ...],
                    binary: bool) -> None:
        self._call(self._linked().send_logits(topic, msg, key, binary))

    def receive(self, timeout: float) -> list[tuple[str, Any]]:
        try:
            first = self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return []
        out = []
        item: tuple[str, Any] | BaseException = first
        while True:
            if isinstance(item, BaseException):
                raise ClientError(str(item)) from item
            out.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return out

    def close(self) -> None:
        link, self._link = self._link, None
        try:
            if link is not None and self._thread.is_alive():
                self._call(link.close(), CLOSE_TIMEOUT_S)
        finally:
            self._stop()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CLOSE_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()


class _Closed:
    """The link of a closed swarm: every use says so."""

    kind = "closed"

    def _refuse(self, *args: Any) -> Any:
        raise ClientError("the swarm is closed")

    join = publish = send_logits = receive = _refuse

    def close(self) -> None:
        pass


_CLOSED = _Closed()


def make_link(cfg: Config, name: str | None, endpoints: tuple[str, str] | None,
              curve: tuple[bytes, bytes, bytes] | None) -> Link:
    kind = cfg.transport.kind
    if kind == "zmq":
        from ._zmq import ZmqLink
        return ZmqLink(cfg, endpoints, curve)
    if kind in ("swergio", "nats"):
        from . import _async
        label = client_name(name)
        return Portal(lambda: _async.make_link(cfg, label, endpoints, curve))
    raise ClientError(f"the sync client speaks zmq, swergio and nats, not {kind!r} (the "
                      "memory bus lives in one event loop: use connect_async there)")


class Swarm:
    """The peers of one process on one connection: models, environments, an evolution
    component, and plain publish/subscribe. Built from the worker's own Config, so it
    connects where the worker listens and uses its topics and step key.

    Use it from one thread at a time (as a ZeroMQ socket); make a swarm per thread that
    needs one. `close()` (or the end of `with`) closes the connection.
    """

    def __init__(self, cfg: Config, *, name: str | None = None, buffer: int = DEFAULT_BUFFER,
                 endpoints: tuple[str, str] | None = None,
                 curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        """`name`: the swergio NAME (and the NATS connection's name). `buffer`: actions,
        and messages per subscribed topic, held for later at most. `endpoints`: ZeroMQ
        (publish to, subscribe to), when the config's addresses are not the peers'.
        `curve`: ZeroMQ CurveZMQ (this peer's public key, its secret key, the worker's
        public key)."""
        self.cfg = cfg
        self.topics = cfg.topics
        self.inbox = Inbox(cfg, buffer)
        self.link: Link = make_link(cfg, name, endpoints, curve)
        self._closed = False

    @classmethod
    def from_config(cls, cfg: Config, **options: Any) -> Swarm:
        return cls(cfg, **options)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            link, self.link = self.link, _CLOSED
            link.close()

    def zmq_sockets(self) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        """ZeroMQ only: the PUB and the SUB, for code that measures the wire itself
        (pre-encoded frames sent, replies read raw). What it reads bypasses the inbox."""
        from ._zmq import ZmqLink

        if not isinstance(self.link, ZmqLink):
            raise ClientError("zmq_sockets(): the swarm is not on ZeroMQ (or is closed)")
        return self.link.pub, self.link.sub

    # -- waiting -------------------------------------------------------------------------

    def pump(self, timeout: float) -> None:
        """File what the link has (waiting up to `timeout` s for the first message)."""
        put = self.inbox.put
        for topic, payload in self.link.receive(timeout):
            put(topic, payload)

    def _until(self, take: Callable[[], T | None], deadline: float | None, what: str) -> T:
        while True:
            got = take()
            if got is not None:
                return got
            left = FOREVER_SLICE_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise NoReply(what)
            self.pump(left)

    # -- roles ---------------------------------------------------------------------------

    def model(self, model_id: str | int, *, binary: bool = False,
              deterministic: bool | None = None) -> Model:
        """A model of this swarm. `binary`: logits as float32 frames (ZeroMQ; JSON on the
        other transports); `deterministic`: its DETERMINISTIC (None: the worker's default)."""
        return Model(self, str(model_id), binary, deterministic)

    def environment(self) -> Environment:
        self.link.join(self.topics.action)
        return Environment(self)

    def evolution(self, retry_s: float = RETRY_S) -> Evolution:
        self.link.join(self.topics.evolution)
        return Evolution(self, retry_s)

    def publish(self, topic: str, body: Body) -> None:
        """Publish an object (JSON) or bytes on a topic; ZeroMQ also takes a list of
        frames. Other peers hear it on swergio and NATS, and through the ZeroMQ proxy."""
        self.link.publish(topic, body)

    def subscribe(self, topic: str) -> Subscription:
        self.inbox.watch(topic)
        self.link.join(topic)
        return Subscription(self, topic)

    def ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """PEEK until answered (on NATS: by every partition); returns the report.

        After it, what this swarm sends reaches the worker and what the worker publishes
        reaches the roles made before the call: ZeroMQ's slow joiner is over."""
        return self.evolution(retry_s=0.1).request("PEEK", timeout=timeout)


class Model:
    """One model: sends its logits for a step key (one step, or a batch of B rows)."""

    def __init__(self, swarm: Swarm, model_id: str, binary: bool,
                 deterministic: bool | None) -> None:
        self.swarm, self.id, self.binary, self.deterministic = (swarm, model_id, binary,
                                                                deterministic)

    def send(self, logits: Any, key: StepKey = None, *, deterministic: bool | None = None,
             extra: Mapping[str, Any] | None = None) -> None:
        """LOGITS: A numbers (list or array), or B rows of A for a batch. `key`: the step
        key (a mapping holding the `window.key` fields, their values in order, or the one
        value); None in lockstep. On NATS it returns once the message is stored."""
        s = self.swarm
        keys = s.inbox.keys
        k = keys.normalize(key)
        det = self.deterministic if deterministic is None else deterministic
        msg = logits_message(self.id, logits, keys.fields_of(k), det, extra)
        s.link.send_logits(s.topics.logits, msg, k, self.binary)


class Environment:
    """Waits for the action of a step key; actions that come first wait in the inbox."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm

    def wait(self, key: StepKey = None, timeout: float | None = 10.0) -> dict[str, Any]:
        """The action message of this step key (ACTION, the key fields, and PARTIAL and
        MODELS when the window closed at its deadline without every model). NoReply
        after `timeout` seconds (None: no limit)."""
        s = self.swarm
        k = s.inbox.keys.normalize(key)
        deadline = None if timeout is None else time.monotonic() + timeout
        return s._until(lambda: s.inbox.take_action(k), deadline,
                        f"no action for step key {k} within {timeout} s")

    def drain(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Every action that has arrived and is not taken yet, waiting up to `timeout` s
        for one when there is none (open-loop environments)."""
        s = self.swarm
        s.pump(0.0)
        if not s.inbox.held and timeout > 0:
            s.pump(timeout)
        return s.inbox.take_all_actions()


class Evolution:
    """GET / PEEK / RESET / SET_MODEL_WEIGHTS with a REQUEST_ID, sent again until answered;
    on NATS, every worker's share, merged."""

    def __init__(self, swarm: Swarm, retry_s: float) -> None:
        self.swarm = swarm
        self.retry_s = retry_s

    def request(self, cmd: str, timeout: float = 10.0, request_id: str | None = None,
                **fields: Any) -> dict[str, Any]:
        s = self.swarm
        rid = request_id or uuid.uuid4().hex
        partitions, merge = merger(s.cfg)
        replies = Replies(partitions, merge)
        s.inbox.expect(rid)
        end = time.monotonic() + timeout
        body = {"CMD": cmd, "REQUEST_ID": rid, **fields}
        try:
            while True:
                s.link.publish(s.topics.evolution, body)
                resend = min(end, time.monotonic() + self.retry_s)
                while True:
                    for r in s.inbox.take_replies(rid):
                        replies.add(r)
                    if replies.complete:
                        return replies.result(cmd, rid)
                    left = resend - time.monotonic()
                    if left <= 0:
                        break
                    s.pump(left)
                if time.monotonic() >= end:
                    raise NoReply(f"{cmd} not answered within {timeout:g} s"
                                  + (f" (partitions {replies.missing} missing)"
                                     if partitions else ""), replies.missing,
                                  replies.result(cmd, rid) if replies.by_worker else None)
        finally:
            s.inbox.forget(rid)

    def get(self, timeout: float = 10.0, request_id: str | None = None) -> dict[str, Any]:
        """The report since the previous GET (CONTRIBUTION, AGREEMENT, MISSED, STEPS...);
        a new period begins. Asked again with the same REQUEST_ID until answered, so a
        lost reply costs nothing; pass `request_id` to repeat a GET after a crash."""
        return self.request("GET", timeout, request_id)

    def peek(self, timeout: float = 10.0) -> dict[str, Any]:
        """The report of the period so far, no reset."""
        return self.request("PEEK", timeout)

    def reset(self, timeout: float = 10.0) -> dict[str, Any]:
        """A new period. RESET has no reply: returns once a PEEK sent after it is answered
        (one connection's messages arrive in order), with that (empty) report."""
        s = self.swarm
        s.link.publish(s.topics.evolution, {"CMD": "RESET", "REQUEST_ID": uuid.uuid4().hex})
        return self.request("PEEK", timeout)

    def set_model_weights(self, weights: Mapping[str, float], timeout: float = 10.0
                          ) -> dict[str, Any]:
        """Per-model weights of the aggregation rule; returns the weights now in force."""
        return self.request("SET_MODEL_WEIGHTS", timeout,
                            MODEL_WEIGHTS={str(k): float(v) for k, v in weights.items()})


class Subscription:
    """Messages on one topic, in order (decoded JSON; bytes when not JSON)."""

    def __init__(self, swarm: Swarm, topic: str) -> None:
        self.swarm = swarm
        self.topic = topic

    def get(self, timeout: float | None = 10.0) -> Any:
        """The next message; NoReply after `timeout` seconds (None: no limit)."""
        s = self.swarm
        deadline = None if timeout is None else time.monotonic() + timeout

        def take() -> tuple[Any] | None:
            found, payload = s.inbox.take_message(self.topic)
            return (payload,) if found else None

        return s._until(take, deadline, f"nothing on {self.topic} within {timeout} s")[0]

    def drain(self) -> list[Any]:
        """Every message that has arrived and is not taken yet, without waiting."""
        self.swarm.pump(0.0)
        queue = self.swarm.inbox.topics.get(self.topic)
        out = list(queue or ())
        if queue:
            queue.clear()
        return out

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> Any:
        return self.get(None)


def connect(cfg: Config | str | os.PathLike[str] | None = None, **options: Any) -> Swarm:
    """A Swarm on the worker's config: a Config, a TOML path, or None (the defaults and
    SWARM_AGG__* variables, as `swarm-aggregator run` reads them)."""
    return Swarm(config_of(cfg), **options)
