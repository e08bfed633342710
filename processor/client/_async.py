"""The async client: `async with connect_async(cfg) as swarm:` and its roles.

One link (transport) per swarm, read by a task of the running event loop into the inbox;
waiters sleep on a future of what they wait for (an action's step key, a request id, a
topic), so many environments waiting at once cost nothing per message.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol, Self

from processor.config import Config

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


class AsyncLink(Protocol):
    kind: str

    async def open(self, receiver: Any) -> None: ...

    async def join(self, topic: str) -> None: ...

    async def publish(self, topic: str, body: Body) -> None: ...

    async def send_logits(self, topic: str, msg: dict[str, Any], key: tuple[Any, ...],
                          binary: bool) -> None: ...

    async def close(self) -> None: ...


class _Closed:
    """The link of a closed swarm: every use says so."""

    kind = "closed"

    async def _refuse(self, *args: Any) -> Any:
        raise ClientError("the swarm is closed")

    open = join = publish = send_logits = _refuse

    async def close(self) -> None:
        pass


_CLOSED = _Closed()


def client_name(name: str | None) -> str:
    return name or f"swarm-client-{uuid.uuid4().hex[:8]}"


def make_link(cfg: Config, name: str | None, endpoints: tuple[str, str] | None,
              curve: tuple[bytes, bytes, bytes] | None) -> AsyncLink:
    kind = cfg.transport.kind
    if kind == "zmq":
        from ._zmq import AsyncZmqLink
        return AsyncZmqLink(cfg, endpoints, curve)
    if kind == "swergio":
        from ._swergio import AsyncSwergioLink
        return AsyncSwergioLink(cfg, client_name(name))
    if kind == "nats":
        from ._nats import AsyncNatsLink
        return AsyncNatsLink(cfg, client_name(name))
    if kind == "memory":
        from ._memory import AsyncMemoryLink
        return AsyncMemoryLink(cfg)
    raise ClientError(f"the client speaks zmq, swergio, nats and memory, not {kind!r}")


def merger(cfg: Config) -> tuple[int | None, Any]:
    """How many partitions must answer an evolution request, and how to merge them."""
    if cfg.transport.kind != "nats":
        return None, None
    from processor.ledger import merge_replies
    return cfg.transport.nats.partitions, merge_replies


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class AsyncSwarm:
    """The peers of one process on one connection: models, environments, an evolution
    component, and plain publish/subscribe. Built from the worker's own Config."""

    def __init__(self, cfg: Config, *, name: str | None = None, buffer: int = DEFAULT_BUFFER,
                 endpoints: tuple[str, str] | None = None,
                 curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self.cfg = cfg
        self.topics = cfg.topics
        self.inbox = Inbox(cfg, buffer)
        self.link: AsyncLink = make_link(cfg, name, endpoints, curve)
        self._waiters: dict[tuple[str, Any], set[asyncio.Future[None]]] = {}
        self._failure: BaseException | None = None
        self._open = False

    @classmethod
    def from_config(cls, cfg: Config, **options: Any) -> AsyncSwarm:
        return cls(cfg, **options)

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.link.open(self)
        self._open = True
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        link, self.link = self.link, _CLOSED
        if self._open:
            self._open = False
            await link.close()
        self.lost(ClientError("the swarm is closed"))

    # -- what the link hands over ---------------------------------------------------------

    def deliver(self, topic: str, payload: Any) -> None:
        woken = self.inbox.put(topic, payload)
        if woken is not None:
            for fut in self._waiters.pop(woken, ()):
                _wake(fut)

    def lost(self, error: BaseException) -> None:
        self._failure = error
        waiters, self._waiters = self._waiters, {}
        for futs in waiters.values():
            for fut in futs:
                _wake(fut)

    async def _until(self, token: tuple[str, Any], take: Any, deadline: float | None,
                     what: str) -> Any:
        """`take()` until it gives something; wait for `token` between tries."""
        loop = asyncio.get_running_loop()
        while True:
            got = take()
            if got is not None:
                return got
            if self._failure is not None:
                raise ClientError(str(self._failure)) from self._failure
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise NoReply(what)
            fut: asyncio.Future[None] = loop.create_future()
            futs = self._waiters.setdefault(token, set())
            futs.add(fut)
            # A timer rather than wait_for: thousands of waits in flight stay cheap.
            timer = None if left is None else loop.call_later(left, _wake, fut)
            try:
                await fut
            finally:
                if timer is not None:
                    timer.cancel()
                futs.discard(fut)
                if not futs and self._waiters.get(token) is futs:
                    del self._waiters[token]

    # -- roles ---------------------------------------------------------------------------

    def model(self, model_id: str | int, *, binary: bool = False,
              deterministic: bool | None = None) -> AsyncModel:
        return AsyncModel(self, str(model_id), binary, deterministic)

    async def environment(self) -> AsyncEnvironment:
        await self.link.join(self.topics.action)
        return AsyncEnvironment(self)

    async def evolution(self, retry_s: float = RETRY_S) -> AsyncEvolution:
        await self.link.join(self.topics.evolution)
        return AsyncEvolution(self, retry_s)

    async def publish(self, topic: str, body: Body) -> None:
        """Publish an object (JSON) or bytes on a topic; ZeroMQ also takes a list of
        frames. Other peers hear it on swergio and NATS, and through the ZeroMQ proxy."""
        await self.link.publish(topic, body)

    async def subscribe(self, topic: str) -> AsyncSubscription:
        self.inbox.watch(topic)
        await self.link.join(topic)
        return AsyncSubscription(self, topic)

    async def ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """PEEK until answered (on NATS: by every partition); returns the report.

        After it, what this swarm sends reaches the worker and what the worker publishes
        reaches this swarm's roles made before the call (ZeroMQ's slow joiner is over)."""
        evo = await self.evolution(retry_s=0.1)
        return await evo.request("PEEK", timeout=timeout)


class AsyncModel:
    """One model: sends its logits for a step key (one step, or a batch of B rows)."""

    def __init__(self, swarm: AsyncSwarm, model_id: str, binary: bool,
                 deterministic: bool | None) -> None:
        self.swarm, self.id, self.binary, self.deterministic = (swarm, model_id, binary,
                                                                deterministic)

    async def send(self, logits: Any, key: StepKey = None, *,
                   deterministic: bool | None = None,
                   extra: Mapping[str, Any] | None = None) -> None:
        """LOGITS: A numbers (list or array), or B rows of A for a batch. `key`: the step
        key (a mapping holding the `window.key` fields, their values in order, or the one
        value); None in lockstep. On NATS it returns once the message is stored."""
        s = self.swarm
        k = s.inbox.keys.normalize(key)
        det = self.deterministic if deterministic is None else deterministic
        msg = logits_message(self.id, logits, s.inbox.keys.fields_of(k), det, extra)
        await s.link.send_logits(s.topics.logits, msg, k, self.binary)


class AsyncEnvironment:
    """Waits for the action of a step key; actions that come first wait in the inbox."""

    def __init__(self, swarm: AsyncSwarm) -> None:
        self.swarm = swarm

    async def wait(self, key: StepKey = None, timeout: float | None = 10.0) -> dict[str, Any]:
        """The action message of this step key (ACTION, the key fields, and PARTIAL and
        MODELS when the window closed at its deadline without every model). NoReply
        after `timeout` seconds (None: no limit)."""
        s = self.swarm
        k = s.inbox.keys.normalize(key)
        deadline = None if timeout is None else time.monotonic() + timeout
        got: dict[str, Any] = await s._until(("action", k), lambda: s.inbox.take_action(k),
                                             deadline, f"no action for step key {k}")
        return got

    def drain(self) -> list[dict[str, Any]]:
        """Every action that has arrived and is not taken yet (open-loop environments)."""
        return self.swarm.inbox.take_all_actions()


class AsyncEvolution:
    """GET / PEEK / RESET / SET_MODEL_WEIGHTS with a REQUEST_ID, sent again until answered."""

    def __init__(self, swarm: AsyncSwarm, retry_s: float) -> None:
        self.swarm = swarm
        self.retry_s = retry_s

    async def request(self, cmd: str, timeout: float = 10.0, request_id: str | None = None,
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
                await s.link.publish(s.topics.evolution, body)
                resend = min(end, time.monotonic() + self.retry_s)
                while True:
                    for r in s.inbox.take_replies(rid):
                        replies.add(r)
                    if replies.complete:
                        return replies.result(cmd, rid)
                    try:
                        await s._until(("reply", rid), lambda: s.inbox.replies.get(rid) or None,
                                       resend, "")
                    except NoReply:
                        break
                if time.monotonic() >= end:
                    raise NoReply(f"{cmd} not answered within {timeout:g} s"
                                  + (f" (partitions {replies.missing} missing)"
                                     if partitions else ""), replies.missing,
                                  replies.result(cmd, rid) if replies.by_worker else None)
        finally:
            s.inbox.forget(rid)

    async def get(self, timeout: float = 10.0, request_id: str | None = None
                  ) -> dict[str, Any]:
        """The report since the previous GET (CONTRIBUTION, AGREEMENT, MISSED, STEPS...);
        a new period begins. Asked again with the same REQUEST_ID until answered, so a
        lost reply costs nothing; pass `request_id` to repeat a GET after a crash."""
        return await self.request("GET", timeout, request_id)

    async def peek(self, timeout: float = 10.0) -> dict[str, Any]:
        """The report of the period so far, no reset."""
        return await self.request("PEEK", timeout)

    async def reset(self, timeout: float = 10.0) -> dict[str, Any]:
        """A new period. RESET has no reply: returns once a PEEK sent after it is answered
        (one connection's messages arrive in order), with that (empty) report."""
        s = self.swarm
        await s.link.publish(s.topics.evolution, {"CMD": "RESET",
                                                  "REQUEST_ID": uuid.uuid4().hex})
        return await self.request("PEEK", timeout)

    async def set_model_weights(self, weights: Mapping[str, float], timeout: float = 10.0
                                ) -> dict[str, Any]:
        """Per-model weights of the aggregation rule; returns the weights now in force."""
        return await self.request("SET_MODEL_WEIGHTS", timeout,
                                  MODEL_WEIGHTS={str(k): float(v) for k, v in weights.items()})


class AsyncSubscription:
    """Messages on one topic, in order (decoded JSON; bytes when not JSON)."""

    def __init__(self, swarm: AsyncSwarm, topic: str) -> None:
        self.swarm = swarm
        self.topic = topic

    async def get(self, timeout: float | None = 10.0) -> Any:
        s = self.swarm
        deadline = None if timeout is None else time.monotonic() + timeout

        def take() -> tuple[Any] | None:
            found, payload = s.inbox.take_message(self.topic)
            return (payload,) if found else None

        got: tuple[Any] = await s._until(("topic", self.topic), take, deadline,
                                         f"nothing on {self.topic}")
        return got[0]

    def drain(self) -> list[Any]:
        """Every message that has arrived and is not taken yet, without waiting."""
        queue = self.swarm.inbox.topics.get(self.topic)
        out = list(queue or ())
        if queue:
            queue.clear()
        return out

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> Any:
        return await self.get(None)


class _Connect:
    """`async with connect_async(cfg) as swarm:` (or `swarm = await connect_async(cfg)`)."""

    def __init__(self, swarm: AsyncSwarm) -> None:
        self.swarm = swarm

    def __await__(self) -> Any:
        return self.swarm.__aenter__().__await__()

    async def __aenter__(self) -> AsyncSwarm:
        return await self.swarm.__aenter__()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.swarm.aclose()


def connect_async(cfg: Config | str | None = None, **options: Any) -> _Connect:
    """An AsyncSwarm on the worker's config (a Config, a TOML path, or None: defaults and
    SWARM_AGG__* variables, as `swarm-aggregator run` reads them)."""
    from ._sync import config_of

    return _Connect(AsyncSwarm(config_of(cfg), **options))
