"""What the sync and async clients share, free of I/O: step keys, messages, the inbox.

Guarantees of the inbox: what arrives before anyone waits for it is kept, up to a bound
(actions by step key, replies by REQUEST_ID, each subscribed topic in its own queue); past
the bound the oldest entry goes first and is counted in `dropped`. Nothing here blocks or
touches a socket: the links (one module per transport) move bytes, and the sync and async
roles wait on this state.
"""

from __future__ import annotations

import collections
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import orjson

from processor.config import Config
from processor.errors import SwarmAggregatorError
from processor.messages import encode, encode_packed

DEFAULT_BUFFER = 10_000     # actions (and messages per subscribed topic) held at most
REMEMBERED_REQUESTS = 256   # request ids whose replies are kept while they are awaited
RETRY_S = 0.5               # an evolution request without its reply(ies) is sent again
F32_MAX = float(np.finfo(np.float32).max)

# A message body as a link sends it: an object (JSON, stamped as the transport wants),
# bytes (sent as they are), or ZeroMQ frames after the topic.
Body = dict[str, Any] | bytes | Sequence[bytes]
StepKey = Mapping[str, Any] | Sequence[Any] | str | int | None


class ClientError(SwarmAggregatorError):
    """The client cannot do what was asked (the connection is gone, a wrong argument)."""


class NoReply(ClientError, TimeoutError):
    """Nothing (or not enough) came back in time.

    `missing` names the NATS partitions no worker answered for, and `partial` holds what
    did come (the merge of the shares that arrived), so a caller can decide to use it.
    """

    def __init__(self, what: str, missing: Sequence[int] = (),
                 partial: dict[str, Any] | None = None) -> None:
        super().__init__(what)
        self.missing = list(missing)
        self.partial = partial


class Receiver(Protocol):
    """Where an async link hands what it reads (in its event loop)."""

    def deliver(self, topic: str, payload: Any) -> None: ...

    def lost(self, error: BaseException) -> None: ...


def decode_body(body: bytes) -> Any:
    """A payload as subscribers get it: the JSON value, or the bytes when it is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body


class Keys:
    """The step key of `window.key`: turns what a caller gives into the key tuple."""

    def __init__(self, fields: Sequence[str]) -> None:
        self.fields = tuple(fields)

    def of(self, obj: Mapping[str, Any]) -> tuple[Any, ...]:
        """The key of a message that arrived (the worker copies the key fields back)."""
        return tuple(obj.get(f) for f in self.fields)

    def normalize(self, key: StepKey) -> tuple[Any, ...]:
        """A key given as a mapping (extra entries ignored: an observation will do), as
        values in `window.key` order, or as one value when the key has one field."""
        fields = self.fields
        if key.__class__ is tuple and len(key) == len(fields) and all(  # the usual form
                v.__class__ is str or v.__class__ is int for v in key):
            return key
        if not fields:
            if key is None or isinstance(key, Mapping):
                return ()
            raise ValueError("window.key is [] (lockstep): a step has no key")
        if key is None:
            raise ValueError(f"a step key is needed: window.key = {list(fields)}")
        if isinstance(key, Mapping):
            missing = [f for f in fields if f not in key]
            if missing:
                raise ValueError(f"the step key lacks {missing} (window.key = {list(fields)})")
            values: Sequence[Any] = [key[f] for f in fields]
        elif isinstance(key, (str, int)) or not isinstance(key, Sequence):
            values = [key]
        else:
            values = key
        if len(values) != len(fields):
            raise ValueError(f"{len(values)} key values for window.key = {list(fields)}")
        return tuple(_key_value(v) for v in values)

    def fields_of(self, key: tuple[Any, ...]) -> dict[str, Any]:
        return dict(zip(self.fields, key))


def _key_value(v: Any) -> Any:
    # The worker takes strings and integers only (not bool, not float): numpy integers are
    # made plain here, so that they encode and compare with what comes back.
    if isinstance(v, str):
        return v
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v)
    raise ValueError(f"a step-key value must be a string or an integer, not {v!r}")


def logits_message(model_id: str, logits: Any, key_fields: Mapping[str, Any],
                   deterministic: bool | None, extra: Mapping[str, Any] | None
                   ) -> dict[str, Any]:
    """The logits object of the contract (LOGITS still in the caller's form)."""
    msg: dict[str, Any] = {"LOGITS": logits, "COMPONENT_ID": model_id}
    if deterministic is not None:
        msg["DETERMINISTIC"] = bool(deterministic)
    msg.update(key_fields)
    if extra:
        msg.update(extra)
    return msg


def json_logits(logits: Any) -> Any:
    """Logits in a form orjson encodes (numpy arrays as they are, made contiguous)."""
    if isinstance(logits, np.ndarray):
        if logits.dtype not in (np.float32, np.float64):
            logits = logits.astype(np.float64)
        return np.ascontiguousarray(logits)
    return logits


def packed_body(msg: dict[str, Any]) -> bytes:
    """A binary logits message as one packed body (`processor.messages.decode_packed`).
    Values past float32's range saturate, as the worker does for JSON (a float64 mask of
    -1e308 stays a mask)."""
    arr = np.asarray(msg["LOGITS"])
    if arr.dtype != np.float32:
        arr = np.clip(arr.astype(np.float64), -F32_MAX, F32_MAX)
    return encode_packed(msg, arr)


def encode_json(msg: dict[str, Any]) -> bytes:
    return encode({**msg, "LOGITS": json_logits(msg["LOGITS"])}) if "LOGITS" in msg \
        else encode(msg)


class Replies:
    """The replies to one evolution request.

    On ZeroMQ and swergio one worker answers: the first reply completes it. On NATS every
    worker answers with its share, tagged with the PARTITIONS it serves: complete once
    they cover 0..P-1 (a repeated request brings a worker's same report again, which
    replaces its earlier copy).
    """

    def __init__(self, partitions: int | None, merge: Callable[[list[dict[str, Any]]],
                                                               dict[str, Any]] | None) -> None:
        self.partitions = partitions
        self.merge = merge
        self.by_worker: dict[str, dict[str, Any]] = {}

    def add(self, reply: dict[str, Any]) -> None:
        self.by_worker[str(reply.get("WORKER", ""))] = reply

    @property
    def missing(self) -> list[int]:
        if self.partitions is None:
            return [] if self.by_worker else [0]
        covered = {p for r in self.by_worker.values() for p in r.get("PARTITIONS", ())}
        return [p for p in range(self.partitions) if p not in covered]

    @property
    def complete(self) -> bool:
        return bool(self.by_worker) and not self.missing

    def result(self, cmd: str, request_id: str) -> dict[str, Any]:
        replies = list(self.by_worker.values())
        if self.merge is None:
            return replies[0] if replies else {}
        if cmd == "SET_MODEL_WEIGHTS":
            weights: dict[str, float] = {}
            for r in replies:
                weights.update(r.get("MODEL_WEIGHTS", {}))
            merged: dict[str, Any] = {
                "MODEL_WEIGHTS": weights, "WORKERS": [r.get("WORKER") for r in replies],
                "PARTITIONS": sorted({p for r in replies for p in r.get("PARTITIONS", ())})}
        else:
            merged = self.merge(replies)
        merged["REQUEST_ID"] = request_id
        return merged


class Inbox:
    """What arrived and is not yet taken, by what it is for. Not thread-safe: one thread
    (sync) or one event loop (async) owns it."""

    def __init__(self, cfg: Config, limit: int = DEFAULT_BUFFER) -> None:
        self.keys = Keys(cfg.window.key)
        self.t_action, self.t_evolution = cfg.topics.action, cfg.topics.evolution
        self.limit = limit
        self.actions: collections.OrderedDict[tuple[Any, ...], collections.deque[
            dict[str, Any]]] = collections.OrderedDict()
        self.held = 0            # actions held
        self.replies: dict[str, list[dict[str, Any]]] = {}
        self.expected: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.topics: dict[str, collections.deque[Any]] = {}
        self.dropped = 0         # entries let go because a bound was reached

    def expect(self, request_id: str) -> None:
        self.expected[request_id] = None
        self.replies.setdefault(request_id, [])
        while len(self.expected) > REMEMBERED_REQUESTS:
            old, _ = self.expected.popitem(last=False)
            self.replies.pop(old, None)

    def forget(self, request_id: str) -> None:
        self.expected.pop(request_id, None)
        self.replies.pop(request_id, None)

    def watch(self, topic: str) -> None:
        self.topics.setdefault(topic, collections.deque())

    def put(self, topic: str, payload: Any) -> tuple[str, Any] | None:
        """File one message; returns what it wakes (("action", key), ("reply", id),
        ("topic", topic)), or None when it is for nobody."""
        woken: tuple[str, Any] | None = None
        queue = self.topics.get(topic)
        if queue is not None:
            queue.append(payload)
            if len(queue) > self.limit:
                queue.popleft()
                self.dropped += 1
            woken = ("topic", topic)
        if not isinstance(payload, dict):
            return woken
        if topic == self.t_action and "ACTION" in payload:
            key = self.keys.of(payload)
            self.actions.setdefault(key, collections.deque()).append(payload)
            self.held += 1
            if self.held > self.limit:
                oldest = next(iter(self.actions))
                self._pop(oldest)
                self.dropped += 1
            return ("action", key)
        if topic == self.t_evolution and "CMD" not in payload:
            rid = payload.get("REQUEST_ID")
            if isinstance(rid, str) and rid in self.expected:
                self.replies[rid].append(payload)
                return ("reply", rid)
        return woken

    def _pop(self, key: tuple[Any, ...]) -> dict[str, Any] | None:
        queue = self.actions.get(key)
        if not queue:
            return None
        self.held -= 1
        action = queue.popleft()
        if not queue:
            del self.actions[key]
        return action

    def take_action(self, key: tuple[Any, ...]) -> dict[str, Any] | None:
        return self._pop(key)

    def take_all_actions(self) -> list[dict[str, Any]]:
        out = [a for queue in self.actions.values() for a in queue]
        self.actions.clear()
        self.held = 0
        return out

    def take_replies(self, request_id: str) -> list[dict[str, Any]]:
        got = self.replies.get(request_id)
        if not got:
            return []
        self.replies[request_id] = []
        return got

    def take_message(self, topic: str) -> tuple[bool, Any]:
        queue = self.topics.get(topic)
        if not queue:
            return False, None
        return True, queue.popleft()
