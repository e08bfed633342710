"""The peers' side of the in-process memory transport (tests, demos, notebooks).

Guarantees: the memory bus's: every message reaches every subscriber of its topic, in
order, exactly once, nothing dropped. Async only, and in the event loop of the worker it
talks to: the bus's queues belong to one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from processor.config import Config
from transports.memory import MemoryBus, Subscription

from ._core import Body, Receiver, decode_body, encode_json, packed_body


class AsyncMemoryLink:
    kind = "memory"

    def __init__(self, cfg: Config, bus: MemoryBus | None = None) -> None:
        self.bus = bus if bus is not None else MemoryBus.named(cfg.transport.memory.bus)
        self._sub: Subscription | None = None
        self._reader: asyncio.Task[None] | None = None

    async def open(self, receiver: Receiver) -> None:
        self._sub = self.bus.subscribe()
        self._reader = asyncio.create_task(self._read(receiver), name="swarm-client-memory")

    async def _read(self, receiver: Receiver) -> None:
        assert self._sub is not None
        while True:
            topic, payload, _, _ = await self._sub.get()
            if topic is None:
                continue
            if isinstance(payload, bytes):
                receiver.deliver(topic, decode_body(payload))
            else:
                receiver.deliver(topic, payload)

    async def join(self, topic: str) -> None:
        assert self._sub is not None, "open the link first"
        self.bus.join(self._sub, topic)

    async def publish(self, topic: str, body: Body) -> None:
        if isinstance(body, dict):
            self.bus.publish(topic, encode_json(body))
        elif isinstance(body, (bytes, bytearray, memoryview)):
            self.bus.publish(topic, bytes(body))
        else:  # frames after the topic: only binary logits (JSON, values) mean anything
            meta, values = body
            self.bus.publish(topic, (bytes(meta), bytes(values)))

    async def send_logits(self, topic: str, msg: dict[str, Any], key: tuple[Any, ...],
                          binary: bool) -> None:
        self.bus.publish(topic, packed_body(msg) if binary else encode_json(msg))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._sub is not None:
            self._sub.close()
            self._sub = None
