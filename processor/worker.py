"""The worker loop: a transport's bytes in, windows, aggregation, actions and replies out.

Per burst of received messages: decode and window every logits message; collect the
windows that close (complete, at their deadline, or evicted); aggregate all of them in one
batched call; publish one action each and credit the ledger. An evolution `CMD: GET` first
flushes what closed before it in the same burst, so its reply counts every action already
decided, then answers with the ledger and resets it (the seed's semantics).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .aggregate import agreement, use_one_thread
from .aggregate import create as create_strategy
from .config import Config
from .errors import RejectedError
from .ledger import Ledger
from .messages import (
    COMMANDS,
    Payload,
    component_id,
    decode_command,
    decode_logits,
    encode,
)
from .metrics import Metrics
from .window import Closed, Windows

if TYPE_CHECKING:  # the core imports no transport; the interface is only a type here
    from transports.base import Envelope, Transport

log = logging.getLogger("swarm_aggregator")

INF = float("inf")
_LITTLE = sys.byteorder == "little"
IDLE_WAIT = 0.1  # longest receive wait, so a stop request is noticed promptly


def _stack(arrays: list[np.ndarray], shape: tuple[int, int, int, int]) -> np.ndarray:
    """The windows' (B, A) float32 arrays as one writable (W, M, B, A) array, in one copy.

    Their bytes joined end to end, which costs a quarter of np.concatenate's per-array
    work; every array the decoder makes is C-contiguous float32 (binary frames' '<f4' is
    the same type on a little-endian machine): anything else takes np.concatenate.
    """
    if _LITTLE:
        try:
            joined = bytearray().join(cast("list[bytes]", arrays))  # (ndarrays are buffers)
            return np.frombuffer(joined, np.float32).reshape(shape)
        except (BufferError, TypeError, ValueError):  # (not C-contiguous)
            pass
    return np.concatenate(arrays).astype(np.float32, copy=False).reshape(shape)


class RateLimitedLog:
    """One warning per reason per interval, with the count of what it held back."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def reject(self, reason: str, detail: str, sender: str | None) -> bool:
        now = self.clock()
        if now - self.last.get(reason, float("-inf")) < self.interval:
            self.held[reason] = self.held.get(reason, 0) + 1
            return False
        held = self.held.pop(reason, 0)
        self.last[reason] = now
        log.warning("rejected message: reason=%s sender=%s %s%s", reason, sender or "?",
                    detail, f" (+{held} more since the last line)" if held else "")
        return True


class Worker:
    def __init__(self, cfg: Config, transport: Transport, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.transport = transport
        self.metrics = metrics or Metrics(max_models=cfg.metrics.max_models)
        self.clock = clock
        self.windows = Windows(cfg.window, start=clock(), max_models=cfg.limits.max_models)
        a = cfg.aggregate
        self.strategy = create_strategy(a.strategy, a.seed, a.temperature)
        self.weights: dict[str, float] = dict(a.weights)
        self.ledger = Ledger(cfg.limits.max_models)
        # The models a window can miss: the roster, or the models of the latest windows,
        # least recent first: as many as a window expects (window.models), or, with
        # models = 0, at most limits.max_models. Ids a peer invents cannot grow it, and a
        # closed window costs the same however many ids were ever seen.
        self.known: OrderedDict[str, None] = OrderedDict.fromkeys(cfg.window.model_ids)
        self.max_known = cfg.expected_models() or cfg.limits.max_models
        self._known_tail: tuple[str, ...] = ()  # the models of the last window, in order
        self.rejects = RateLimitedLog(cfg.log.rate_limit_s, clock)
        self.key_fields = tuple(cfg.window.key)
        self.default_det = cfg.aggregate.deterministic
        t = cfg.topics
        self.t_logits, self.t_action, self.t_evolution = t.logits, t.action, t.evolution
        self.limits = cfg.limits
        self.published = 0
        self._open_shown = -1  # open windows last set in the gauge (set when it changes)
        self.acks = transport.acks
        transport.on_reject = self.reject  # what the transport refuses is counted here

    # -- intake -------------------------------------------------------------------------

    def reject(self, reason: str, detail: str = "", sender: str | None = None) -> None:
        self.metrics.reject(reason)
        self.rejects.reject(reason, detail, sender)

    def _count(self, replaced: int, n_logits: int, n_evolution: int) -> None:
        """The burst's counts, booked once for the burst."""
        if replaced:
            self.metrics.reject("duplicate", replaced)
            self.rejects.reject("duplicate", "lockstep: a model sent again; its newer logits "
                                "replace the older", None)
        if n_logits:
            self.metrics.receive(self.t_logits, n_logits)
        if n_evolution:
            self.metrics.receive(self.t_evolution, n_evolution)

    def _due(self) -> float:
        deadline = self.windows.next_deadline()
        return INF if deadline is None else deadline

    def _request(self, payload: Payload) -> dict[str, Any] | None:
        """An evolution command for this worker, or None (WEIGHTS and the like, never
        parsed; replies of workers; commands it does not know)."""
        try:
            request = decode_command(payload, self.limits.max_message_bytes)
        except RejectedError as e:
            self.reject(e.reason, e.detail)
            return None
        if request is None or request.get("CMD") not in COMMANDS:
            return None
        return request

    async def handle(self, batch: list[Envelope]) -> None:
        """Process one burst of envelopes: windows, then what closed, then actions."""
        pending: list[Closed] = []
        settled: list[Any] = []  # tokens of rejected messages (acknowledging transports)
        lim = self.limits
        n_logits = n_evolution = 0
        windows = self.windows
        replaced = windows.replaced
        # The per-message path, with its names bound once: it runs for every message.
        t_logits, add, key_fields = self.t_logits, windows.add, self.key_fields
        max_bytes, max_actions, max_batch = lim.max_message_bytes, lim.max_actions, lim.max_batch
        # When the loop was busy past a window's deadline, the window closes before the
        # first message of the burst that came after it (that message is late for it).
        timed = bool(windows.timeout)
        due = self._due() if timed else INF
        for topic, payload, at, token in batch:
            if at >= due:
                pending += windows.expire(at)
                due = self._due()
            if topic == t_logits:
                n_logits += 1
                try:
                    msg = decode_logits(payload, key_fields, max_bytes, max_actions, max_batch)
                    if token is not None:
                        msg.token = token
                    closed = add(msg, at)
                    if closed:
                        pending += closed
                    if due == INF and timed:
                        due = self._due()
                except RejectedError as e:
                    self.reject(e.reason, e.detail, e.sender)
                    if token is not None:
                        settled.append(token)
            elif topic == self.t_evolution:
                n_evolution += 1
                request = self._request(payload)
                if request is not None:
                    # What closed before the command in this burst counts in its reply.
                    await self._flush(pending)
                    pending = []
                    await self._command(request["CMD"], request)
        self._count(windows.replaced - replaced, n_logits, n_evolution)
        pending += windows.expire(self.clock())
        await self._finish(pending, settled)

    async def _finish(self, pending: list[Closed], settled: list[Any]) -> None:
        """Actions of what closed; rejected messages settled; the open-window gauge."""
        await self._flush(pending)
        if settled:
            await self.transport.settle(settled)
        if len(self.windows) != self._open_shown:
            self._open_shown = len(self.windows)
            self.metrics.open_windows.set(self._open_shown)

    # -- output -------------------------------------------------------------------------

    async def _flush(self, closed: list[Closed]) -> None:
        if not closed:
            return
        todo = [c for c in closed if c.publish]
        if todo:
            # The actions first: what follows (the models that missed windows, the ledger,
            # the metrics) changes nothing in them, and the environments are waiting.
            await self._publish(todo)
        tokens: list[Any] = []
        known, roster = self.known, bool(self.cfg.window.model_ids)
        for c in closed:
            self.metrics.closed(c.outcome)
            if c.window.tokens:
                tokens += c.window.tokens
            models = c.window.models
            if not roster:
                order = tuple(models)
                if order != self._known_tail:
                    # (Otherwise the latest models are these, in this order, already: the
                    # lockstep case, where touching them again would change nothing.)
                    touch = known.move_to_end
                    for m in order:
                        if m in known:
                            touch(m)
                        else:
                            known[m] = None
                    while len(known) > self.max_known:
                        known.popitem(last=False)
                    self._known_tail = order
            if len(models) < len(known):
                missing = known.keys() - models.keys()
                self.ledger.miss(missing)
                self.metrics.missed(missing)
        if tokens:
            # Only now: a message is acknowledged once its window's action is out.
            await self.transport.settle(tokens)

    async def _publish(self, todo: list[Closed]) -> None:
        # Windows of one shape (models, environments, actions) are aggregated together.
        groups: dict[tuple[int, ...], list[Closed]] = {}
        for c in todo:
            models = c.window.models
            groups.setdefault((len(models), *next(iter(models.values())).shape), []).append(c)
        for (m, b, a), group in groups.items():
            await self._publish_group(group, m, b, a)

    async def _publish_group(self, group: list[Closed], m: int, b: int, a: int) -> None:
        t0 = time.perf_counter()
        x = _stack([v for c in group for v in c.window.models.values()], (len(group), m, b, a))
        default = self.default_det
        det = np.array([default if c.window.deterministic is None else c.window.deterministic
                        for c in group], dtype=bool)
        weights = None
        if self.weights:
            wt = self.weights
            weights = np.array([[wt.get(k, 1.0) for k in c.window.models] for c in group],
                               dtype=np.float32)
        actions, credit = self.strategy.decide(x, det, weights)
        aggregated = time.perf_counter()
        key_fields, acks, clock = self.key_fields, self.acks, self.clock
        stamp, publish, t_action = self.transport.stamp, self.transport.publish, self.t_action
        first_s, last_s = [], []
        for c, act in zip(group, actions.tolist()):
            win = c.window
            msg: dict[str, Any] = {"ACTION": act}
            for f, v in zip(key_fields, win.key):
                msg[f] = v
            if c.partial:
                msg["PARTIAL"] = True
                msg["MODELS"] = m
            if win.extra:
                msg.update(win.extra)
            extra = stamp(t_action)
            if extra:
                msg.update(extra)
            await publish(t_action, encode(msg), "|".join(map(str, win.key)) if acks else None)
            now = clock()
            first_s.append(now - win.first_at)
            last_s.append(now - win.last_at)
        # The books, once the actions are out.
        metrics = self.metrics
        metrics.aggregation.observe((aggregated - t0) / len(group))
        metrics.published_many(first_s, last_s, b)
        per_model = self.ledger.add_many([list(c.window.models) for c in group], credit,
                                         agreement(x, actions))
        self.published += len(group)
        if per_model:
            names, credits, steps, agreed = zip(*per_model)
            metrics.credit(names, credits, steps, agreed)

    async def _command(self, cmd: str, request: dict[str, Any]) -> None:
        """Answer one evolution command (see COMMANDS)."""
        self.metrics.evolution.labels(cmd).inc()
        rid = request.get("REQUEST_ID")
        rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
        name = self.strategy.name
        reply: dict[str, Any]
        if cmd == "GET":
            reply = dict(self.ledger.take(rid, name))
        elif cmd == "PEEK":
            reply = self.ledger.report(name)
        elif cmd == "RESET":
            self.ledger.reset()
            return
        else:  # SET_MODEL_WEIGHTS
            new = request.get("MODEL_WEIGHTS")
            if not isinstance(new, dict) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e30
                    for v in new.values()):
                self.reject("bad_command", "MODEL_WEIGHTS must map models to numbers >= 0",
                            component_id(request))
                return
            self.weights.update({str(k): float(v) for k, v in new.items()})
            reply = {"MODEL_WEIGHTS": dict(self.weights)}
        if rid is not None:
            reply["REQUEST_ID"] = rid
        await self._reply(reply, request)

    async def _reply(self, reply: dict[str, Any], request: dict[str, Any]) -> None:
        stamp = self.transport.stamp(self.t_evolution)
        if stamp:
            for f in ("ROOT_ID", "MODEL_STATUS"):
                if f in request:
                    reply[f] = request[f]
            reply.update(stamp)
        await self.transport.publish(self.t_evolution, encode(reply))

    # -- the loop -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, started: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set; then publish what has its quorum and close."""
        use_one_thread()
        # What start-up allocated (the imports: torch alone brings 100,000s of objects)
        # leaves the collector's scans: a full collection would otherwise stop the worker
        # for tens of milliseconds now and then, in the middle of a window.
        gc.freeze()
        async with self.transport:
            self.metrics.ready.set(1 if self.transport.ready else 0)
            if started is not None:
                started.set()
            try:
                while not stop.is_set():
                    self.metrics.ready.set(1 if self.transport.ready else 0)
                    wait = IDLE_WAIT
                    deadline = self.windows.next_deadline()
                    if deadline is not None:
                        wait = min(wait, max(0.0, deadline - self.clock()))
                    batch = await self.transport.receive(wait)
                    await self.handle(batch)
            finally:
                if not self.acks:
                    await self._flush(self.windows.close_all())
                # An acknowledging transport redelivers the open windows' messages to
                # whichever worker serves their partition next: nothing to publish here.
                self.metrics.ready.set(0)


