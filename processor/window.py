"""Windows: the logits of one step, collected from the expected models.

Pure and synchronous: the clock is an argument (`now`, seconds on any monotonic clock), so
the tests need neither an event loop nor sleeps.

- Lockstep (`window.key = []`): one window at a time, as the seed does; it closes when every
  expected model has sent once. A model that sends twice replaces its earlier logits (the
  seed's rule; counted as `duplicate`); with a step key the repeat is refused instead.
- Keyed: the step-key fields of a message name its window; many may be open at once.
- Expected models: a count (`window.models`), a roster (`window.model_ids`), or, with
  `models = 0`, the models seen within `window.recent_s` (after a warm-up of that length,
  during which windows close only at their deadline).
- Deadline: `window.timeout_ms` after the first message. Then a window with at least
  `window.min_models` models closes as `partial` (it is published, marked PARTIAL), one
  with fewer is `dropped`.
- Cap: at most `window.max_open` open windows; opening one more closes the oldest first
  (`evicted`; published as PARTIAL when it has its quorum, else discarded).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import WindowConfig
from .errors import RejectedError
from .messages import Logits

COMPLETE, PARTIAL, DROPPED, EVICTED = "complete", "partial", "dropped", "evicted"
OUTCOMES = (COMPLETE, PARTIAL, DROPPED, EVICTED)


@dataclass(slots=True)
class Window:
    key: tuple[Any, ...]
    first_at: float
    deadline: float
    shape: tuple[int, ...]
    models: dict[str, np.ndarray] = field(default_factory=dict)
    deterministic: bool | None = None  # of the last accepted message (the seed's rule)
    last_at: float = 0.0
    extra: dict[str, Any] | None = None
    tokens: list[Any] | None = None  # delivery tokens of its messages, to settle when done


@dataclass(slots=True)
class Closed:
    window: Window
    outcome: str
    publish: bool  # complete, or closed early with its quorum

    @property
    def partial(self) -> bool:
        return self.outcome != COMPLETE


class Windows:
    """The open windows, and the rules that close them."""

    def __init__(self, cfg: WindowConfig, min_models: int | None = None,
                 start: float = 0.0, max_models: int = 1024) -> None:
        self.cfg = cfg
        self.roster = frozenset(cfg.model_ids)
        self.expected = len(self.roster) or cfg.models
        self.min_models = cfg.min_models if min_models is None else min_models
        self.timeout = cfg.timeout_ms / 1000.0
        self.open: OrderedDict[tuple[Any, ...], Window] = OrderedDict()
        self.closed_keys: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self.keyed = bool(cfg.key)
        self.replaced = 0  # lockstep repeats that replaced a model's earlier logits
        # models = 0: recent membership
        self.start = start
        # models = 0: when each model was last seen, least recent first, at most max_models
        self.last_seen: OrderedDict[str, float] = OrderedDict()
        self.max_models = max_models
        self._active: frozenset[str] = frozenset()
        self._active_at = float("-inf")

    def __len__(self) -> int:
        return len(self.open)

    def next_deadline(self) -> float | None:
        """When the oldest open window times out, or None."""
        if not self.timeout or not self.open:
            return None
        return next(iter(self.open.values())).deadline

    def add(self, msg: Logits, now: float) -> list[Closed]:
        """Add one model's logits; returns the windows this closes (complete or evicted).

        Raises RejectedError (unknown_model, late, duplicate, shape, too_many_models); the
        window goes on.
        """
        if self.roster and msg.model not in self.roster:
            raise RejectedError("unknown_model", "not in window.model_ids", msg.model)
        key = msg.key
        closed: list[Closed] = []
        win = self.open.get(key)
        model, logits = msg.model, msg.logits
        if win is None:
            win = self._open(msg, now, closed)
        else:
            models = win.models
            # The checks of _admit, only when one of them can fail (or replace).
            if (model in models or logits.shape != win.shape
                    or len(models) >= self.max_models):
                self._admit(win, msg)
        win.models[model] = logits
        if msg.token is not None:
            if win.tokens is None:
                win.tokens = []
            win.tokens.append(msg.token)
        win.deterministic = msg.deterministic
        win.last_at = now
        win.extra = msg.extra  # the last message's ROOT_ID / MODEL_STATUS, as the seed
        expected = self.expected
        if (len(win.models) >= expected if expected else self._recent(win, model, now)):
            del self.open[key]
            closed.append(self._close(win, COMPLETE))
        return closed

    def _open(self, msg: Logits, now: float, closed: list[Closed]) -> Window:
        """A new window for msg's key (closing the oldest first when at the cap)."""
        key = msg.key
        if self.keyed and key in self.closed_keys:
            raise RejectedError("late", f"window {key!r} already closed", msg.model)
        if len(self.open) >= self.cfg.max_open:
            _, oldest = self.open.popitem(last=False)
            closed.append(self._close(oldest, EVICTED))
        deadline = now + self.timeout if self.timeout else float("inf")
        win = Window(key, now, deadline, msg.logits.shape)
        self.open[key] = win
        return win

    def _admit(self, win: Window, msg: Logits) -> None:
        """Whether msg may join an open window; raises RejectedError if not."""
        if msg.model in win.models and self.keyed:
            raise RejectedError("duplicate", f"second message for window {win.key!r}",
                                msg.model)
        if msg.logits.shape != win.shape:
            raise RejectedError("shape", f"shape {msg.logits.shape} in a window of {win.shape}",
                                msg.model)
        if msg.model in win.models:
            # Lockstep has no step key: a model that sends again has moved on to the next
            # step (after a lost action, or a reconnect), so its newer logits replace the
            # older ones, as the seed's memory[id] = logits does, and the repeat is counted.
            self.replaced += 1
        elif len(win.models) >= self.max_models:
            # Only with models = 0 can a window grow past the models it expects.
            raise RejectedError("too_many_models", f"window {win.key!r} already has "
                                f"{len(win.models)} models (limits.max_models)", msg.model)

    def _recent(self, win: Window, model: str, now: float) -> bool:
        """models = 0: whether win holds every model seen within recent_s (after the
        warm-up); notes that `model` was seen now."""
        seen = self.last_seen
        seen[model] = now
        seen.move_to_end(model)
        if len(seen) > self.max_models:
            seen.popitem(last=False)
        return now - self.start >= self.cfg.recent_s and self._covers(win, now)

    def expire(self, now: float) -> list[Closed]:
        """Close every window whose deadline has passed."""
        closed: list[Closed] = []
        while self.open:
            win = next(iter(self.open.values()))
            if win.deadline > now:
                break
            del self.open[win.key]
            if not self.expected and self._covers(win, now):
                closed.append(self._close(win, COMPLETE))
            else:
                closed.append(self._close(win, PARTIAL))
        return closed

    def close_all(self) -> list[Closed]:
        """Close every open window now (shutdown): quorum publishes, the rest is dropped."""
        closed = [self._close(w, PARTIAL) for w in self.open.values()]
        self.open.clear()
        return closed

    def _close(self, win: Window, outcome: str) -> Closed:
        publish = outcome == COMPLETE or len(win.models) >= self.min_models
        if outcome == PARTIAL and not publish:
            outcome = DROPPED
        if self.keyed and self.cfg.late_memory:
            self.closed_keys[win.key] = None
            if len(self.closed_keys) > self.cfg.late_memory:
                self.closed_keys.popitem(last=False)
        return Closed(win, outcome, publish)

    def _covers(self, win: Window, now: float) -> bool:
        if now - self._active_at > self.cfg.recent_s / 100:
            horizon = now - self.cfg.recent_s
            seen = self.last_seen
            while seen and next(iter(seen.values())) < horizon:  # least recent first
                seen.popitem(last=False)
            self._active = frozenset(self.last_seen)
            self._active_at = now
        return all(m in win.models for m in self._active)
