"""Transports move bytes between the bus and the worker, nothing else.

`transports.create(cfg)` picks one by `transport.kind` from a table of lazy import strings,
so an optional dependency loads only when its transport is used.
"""

from .base import TRANSPORTS, Envelope, Transport, create

__all__ = ["TRANSPORTS", "Envelope", "Transport", "create"]
