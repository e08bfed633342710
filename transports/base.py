"""The transport interface: small, async and structural.

    async with transport:                      # connect / bind, subscribe; close on exit
        batch = await transport.receive(0.1)   # what is ready now, [] after the timeout
        await transport.publish(topic, payload)

An envelope is `(topic, payload, received_at, token)`: the topic, the payload (the raw
bytes; a pair of frames for binary logits; or the object already decoded, where the
transport had to read the body to learn its topic, as swergio's `TO_ROOM`),
`time.monotonic()` when the bytes were read, and a delivery token (None unless the
transport acknowledges). Each transport applies its own wire rules (which messages are
the worker's, and under which topic) before it hands an envelope over. `receive` drains
everything already waiting (up to a burst cap), so the worker can aggregate the windows of
one burst together.

A transport with `acks = True` is at-least-once: the worker hands every token back to
`settle(tokens)` once the message is done with (its window's action published, its window
dropped, or the message rejected), and passes each action's step key to `publish` as
`dedup`, so that a redelivered window is not published twice.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, Self

from processor.config import Config
from processor.errors import ConfigError
from processor.messages import Payload

Envelope = tuple[str | None, Payload, float, Any]
# Called by a transport for input it refuses before the worker sees it (reason, detail).
RejectHook = Callable[[str, str], None]

TRANSPORTS: dict[str, str] = {
    "zmq": "transports.zeromq:ZmqTransport",
    "swergio": "transports.swergio:SwergioTransport",
    "memory": "transports.memory:MemoryTransport",
    "nats": "transports.nats:NatsTransport",
}

MAX_BURST = 4096


class Transport(Protocol):
    ready: bool  # connected and subscribed
    acks: bool   # at-least-once: tokens must be settled (see the module's docstring)
    # Where the transport reports input it refuses before the worker sees it (counted and
    # logged there); the worker sets it to its own.
    on_reject: RejectHook

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None: ...

    async def receive(self, timeout: float | None) -> list[Envelope]: ...

    async def publish(self, topic: str, payload: bytes, dedup: str | None = None) -> bool: ...

    def stamp(self, topic: str) -> dict[str, Any] | None:
        """Fields this transport's peers expect in every outgoing message (or None)."""
        ...

    async def settle(self, tokens: list[Any]) -> None:
        """Done with these messages (acknowledge them); a no-op where `acks` is False."""
        ...


def _noop(reason: str, detail: str) -> None:
    pass


def create(cfg: Config, on_reject: RejectHook | None = None, **kwargs: Any) -> Transport:
    """The transport that `cfg.transport.kind` names."""
    target = TRANSPORTS.get(cfg.transport.kind)
    if target is None:
        raise ConfigError("transport.kind", f"unknown transport {cfg.transport.kind!r} "
                          f"(valid: {', '.join(sorted(TRANSPORTS))})")
    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    transport: Transport = cls(cfg, on_reject or _noop, **kwargs)
    return transport
