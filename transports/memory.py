"""In-process transport: a named bus of topics inside one Python process.

Guarantees: every message published on a topic reaches every subscriber of that topic, in
order, exactly once; nothing is ever dropped (queues are unbounded). For tests and demos.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any, ClassVar, Self

from processor.config import Config
from processor.messages import Payload

from .base import MAX_BURST, Envelope, RejectHook


class Subscription:
    """A reader of some topics of a bus (the worker, or a test's peer)."""

    def __init__(self, bus: MemoryBus, topics: tuple[str, ...]) -> None:
        self.bus = bus
        self.topics = topics
        self.queue: asyncio.Queue[Envelope] = asyncio.Queue()

    async def get(self, timeout: float | None = None) -> Envelope:
        return await asyncio.wait_for(self.queue.get(), timeout)

    def drain(self, limit: int = MAX_BURST) -> list[Envelope]:
        out: list[Envelope] = []
        while len(out) < limit:
            try:
                out.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return out

    def close(self) -> None:
        self.bus.unsubscribe(self)


class MemoryBus:
    _named: ClassVar[dict[str, MemoryBus]] = {}

    def __init__(self) -> None:
        self.subscribers: dict[str, list[Subscription]] = {}

    @classmethod
    def named(cls, name: str) -> MemoryBus:
        """The process-wide bus of that name (created on first use)."""
        bus = cls._named.get(name)
        if bus is None:
            bus = cls._named[name] = cls()
        return bus

    def subscribe(self, *topics: str) -> Subscription:
        sub = Subscription(self, topics)
        for t in topics:
            self.subscribers.setdefault(t, []).append(sub)
        return sub

    def join(self, sub: Subscription, topic: str) -> None:
        """One more topic for a subscription."""
        if topic not in sub.topics:
            sub.topics = (*sub.topics, topic)
            self.subscribers.setdefault(topic, []).append(sub)

    def unsubscribe(self, sub: Subscription) -> None:
        for t in sub.topics:
            subs = self.subscribers.get(t, [])
            if sub in subs:
                subs.remove(sub)

    def publish(self, topic: str, payload: Payload) -> None:
        now = time.monotonic()
        for sub in self.subscribers.get(topic, ()):
            sub.queue.put_nowait((topic, payload, now, None))


class MemoryTransport:
    acks = False

    def __init__(self, cfg: Config, on_reject: RejectHook, bus: MemoryBus | None = None) -> None:
        self.bus = bus if bus is not None else MemoryBus.named(cfg.transport.memory.bus)
        self.topics = (cfg.topics.logits, cfg.topics.evolution)
        self.on_reject = on_reject
        self.ready = False
        self._sub: Subscription | None = None

    async def __aenter__(self) -> Self:
        self._sub = self.bus.subscribe(*self.topics)
        self.ready = True
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.ready = False
        if self._sub is not None:
            self._sub.close()
            self._sub = None

    async def receive(self, timeout: float | None) -> list[Envelope]:
        assert self._sub is not None, "use 'async with transport'"
        batch = self._sub.drain()
        if batch:
            return batch
        try:
            first = await self._sub.get(timeout)
        except TimeoutError:
            return []
        return [first, *self._sub.drain(MAX_BURST - 1)]

    async def publish(self, topic: str, payload: bytes, dedup: str | None = None) -> bool:
        self.bus.publish(topic, payload)
        return True

    async def settle(self, tokens: list[Any]) -> None:
        pass  # at-most-once: nothing to acknowledge

    def stamp(self, topic: str) -> dict[str, Any] | None:
        return None
