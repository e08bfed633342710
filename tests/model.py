"""A reference model of the intake contract, written from DESIGN.md and the README alone.

It reads the same bytes the worker reads and predicts, message by message, what the worker
must do: the rejection reason of every refused message, every window that closes (and how),
every action published and every evolution reply. It shares no code with `processor/`
(decoding is the standard library's `json`, the math is `tests/reference.py` in float64), so
an agreement between the two is evidence, not a tautology.

Scope, chosen so that every prediction is exact:
- deterministic mode only (a sampled action cannot be predicted), strategy `sum_probs`;
- the generator guarantees a clear winner in every window (see `Reference.others`), so the
  argmax is the same in float64 here and in the worker's float32, and no exact ties;
- expected models as a count or a roster (not `models = 0`), fewer distinct models in a
  period than `limits.max_models` (no OVERFLOW), fewer REQUEST_IDs than are remembered;
- no finite logits beyond float32 range, no `DETERMINISTIC: null`, no unreadable evolution
  messages (`not_json` or `bad_command` would both be readings of the contract there).

Readings of the contract where its text leaves a choice (each is stated where it is used):
- keyed mode: a model's second message for an open window is `duplicate`, whatever its
  shape (the window already holds that model's logits); lockstep: the repeat replaces the
  older logits, so its shape must match the window (else `shape`), and it is counted
  `duplicate` all the same;
- a one-row batch (`[[...]]`) and a plain row (`[...]`) are the same shape, B = 1;
- MISSED (README: "of the roster, or of the last `window.models` models seen"): a model is
  seen when a window it took part in closes (the models of one window in the order they
  joined it; a lockstep repeat keeps its place); the seen models are the `window.models` most
  recently seen; each closed window (published or not) counts one miss for each of them it
  lacks;
- a window is due at `first message + timeout` exactly, and closes before any message that
  is received at or after that instant (that message then finds the window closed).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tests.reference import clear_winner, softmax, sum_probs

REASONS = ("too_large", "bad_frame", "not_json", "not_object", "missing_field",
           "bad_component_id", "bad_logits", "non_finite", "bad_deterministic", "bad_key",
           "shape", "duplicate", "late", "unknown_model", "too_many_models", "bad_command")
OUTCOMES = ("complete", "partial", "dropped", "evicted")
REMEMBERED_REQUESTS = 64   # README: "the last 64 ids are remembered"
MARGIN = 1e-3              # top-two gap of P that float32 noise cannot close
COMMANDS = ("GET", "PEEK", "RESET")


@dataclass(frozen=True)
class Contract:
    """The settings the model needs, read from the same mapping the worker's config is."""

    key: tuple[str, ...]
    models: int
    roster: frozenset[str]
    timeout_ms: int
    min_models: int
    max_open: int
    late_memory: int
    deterministic: bool
    max_message_bytes: int
    max_actions: int
    max_batch: int
    max_models: int      # limits.max_models: models the worker keeps state for
    label_models: int    # metrics.max_models: distinct model labels

    @classmethod
    def from_mapping(cls, m: dict[str, Any]) -> Contract:
        w, a, lim = m.get("window", {}), m.get("aggregate", {}), m.get("limits", {})
        met = m.get("metrics", {})
        # The defaults are the documented ones (DESIGN.md / README configuration table).
        return cls(key=tuple(w.get("key", [])), models=w.get("models", 20),
                   roster=frozenset(str(x) for x in w.get("model_ids", [])),
                   timeout_ms=w.get("timeout_ms", 5000), min_models=w.get("min_models", 1),
                   max_open=w.get("max_open", 1024), late_memory=w.get("late_memory", 65536),
                   deterministic=a.get("deterministic", False),
                   max_message_bytes=lim.get("max_message_bytes", 16 * 1024 * 1024),
                   max_actions=lim.get("max_actions", 100_000),
                   max_batch=lim.get("max_batch", 4096),
                   max_models=lim.get("max_models", 1024),
                   label_models=met.get("max_models", 100))

    @property
    def expected(self) -> int:
        return len(self.roster) or self.models


@dataclass
class Message:
    model: str
    rows: np.ndarray             # float64 (B, A)
    deterministic: bool | None
    key: tuple[Any, ...]


@dataclass
class Window:
    key: tuple[Any, ...]
    opened_ms: int
    shape: tuple[int, int]
    logits: dict[str, np.ndarray] = field(default_factory=dict)
    deterministic: bool | None = None


@dataclass
class Closure:
    """One window closed: what the contract says must be seen of it."""

    key: tuple[Any, ...]
    outcome: str
    models: tuple[str, ...]
    action: dict[str, Any] | None  # the action message, when published


def _no_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity; JSON has no such literals.
    raise ValueError(f"{name} is not JSON")


def _is_number(v: Any) -> bool:
    # JSON true/false are not numbers (Python's bool is an int: refuse it explicitly).
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Ledger:
    """The evolution ledger as the README's protocol table describes it."""

    def __init__(self) -> None:
        self.epoch = 0
        self.answered: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._period()

    def _period(self) -> None:
        self.credit: dict[str, float] = {}
        self.taken: dict[str, int] = {}     # environment steps each model took part in
        self.agreed: dict[str, int] = {}    # of those, steps where its argmax was taken
        self.missed: dict[str, int] = {}
        self.steps = 0

    def book(self, models: list[str], credit: np.ndarray, agree: np.ndarray) -> None:
        b = credit.shape[1]
        for i, m in enumerate(models):
            self.credit[m] = self.credit.get(m, 0.0) + float(credit[i].sum())
            self.taken[m] = self.taken.get(m, 0) + b
            self.agreed[m] = self.agreed.get(m, 0) + int(agree[i].sum())
        self.steps += b

    def miss(self, models: Iterable[str]) -> None:
        for m in models:
            self.missed[m] = self.missed.get(m, 0) + 1

    def report(self) -> dict[str, Any]:
        return {"CONTRIBUTION": dict(self.credit),
                "AGREEMENT": {m: self.agreed[m] / self.taken[m] for m in self.taken},
                "MISSED": dict(self.missed), "STEPS": self.steps, "EPOCH": self.epoch,
                "STRATEGY": "sum_probs"}

    def reset(self) -> None:
        self._period()
        self.epoch += 1

    def get(self, rid: str | None) -> dict[str, Any]:
        if rid is not None and rid in self.answered:
            return self.answered[rid]  # the lost reply again, and no second reset
        out = self.report()
        self.reset()
        if rid is not None:
            out["REQUEST_ID"] = rid
            self.answered[rid] = out
            if len(self.answered) > REMEMBERED_REQUESTS:
                self.answered.popitem(last=False)
        return out


class Reference:
    """The worker as the contract describes it; feed it bytes, read what must come out."""

    def __init__(self, contract: Contract) -> None:
        self.c = contract
        self.open: OrderedDict[tuple[Any, ...], Window] = OrderedDict()  # by opening time
        self.closed_keys: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        # The models a window can miss, least recently seen first (the roster: fixed).
        self.seen: OrderedDict[str, None] = OrderedDict.fromkeys(sorted(contract.roster))
        self.accepted_ids: set[str] = set()
        self.ledger = Ledger()
        self.rejected = dict.fromkeys(REASONS, 0)
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.published = 0
        self.env_steps = 0
        self.actions: list[dict[str, Any]] = []   # published since the last `take`
        self.replies: list[dict[str, Any]] = []
        self.closures: list[Closure] = []

    # -- what the test reads --------------------------------------------------------------

    def take(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Closure]]:
        out = self.actions, self.replies, self.closures
        self.actions, self.replies, self.closures = [], [], []
        return out

    def others(self, key: tuple[Any, ...], model: str) -> tuple[tuple[int, int], np.ndarray
                                                                 ] | None:
        """The open window `key` (its shape, and P summed over its models but `model`).

        For the generator: logits for `model` are chosen so that the window stays clear
        (every top-two gap of P over MARGIN) whichever moment it closes at.
        """
        win = self.open.get(key)
        if win is None:
            return None
        total = np.zeros(win.shape)
        for m, x in win.logits.items():
            if m != model:
                total += softmax(x)
        return win.shape, total

    # -- intake ----------------------------------------------------------------------------

    def receive(self, topic: str, payload: bytes, now_ms: int) -> str | None:
        """One message; returns the rejection reason, or None."""
        self.expire(now_ms)  # a due window closes before what arrives at or after its deadline
        if topic == "evolution":
            self._command(payload)
            return None
        parsed = self._decode(payload)
        reason = parsed if isinstance(parsed, str) else self._window(parsed, now_ms)
        if reason is not None:
            self.rejected[reason] += 1
        return reason

    def _decode(self, payload: bytes) -> Message | str:
        c = self.c
        if len(payload) > c.max_message_bytes:
            return "too_large"
        try:
            obj = json.loads(payload, parse_constant=_no_constant)
        except ValueError:
            return "not_json"  # README: NaN and Infinity literals included
        if not isinstance(obj, dict):
            return "not_object"
        if "LOGITS" not in obj or "COMPONENT_ID" not in obj:
            return "missing_field"
        cid = obj["COMPONENT_ID"]
        if isinstance(cid, str) and cid:
            model = cid
        elif _is_number(cid):
            model = str(cid)  # "a number is accepted and made a string"
        else:
            return "bad_component_id"
        rows = self._rows(obj["LOGITS"])
        if isinstance(rows, str):
            return rows
        det = obj.get("DETERMINISTIC")
        if "DETERMINISTIC" in obj and not isinstance(det, bool):
            return "bad_deterministic"
        key = []
        for f in c.key:
            v = obj.get(f)
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                return "bad_key"
            key.append(v)
        return Message(model, rows, det, tuple(key))

    def _rows(self, raw: Any) -> np.ndarray | str:
        if not isinstance(raw, list) or not raw:
            return "bad_logits"
        if all(_is_number(v) for v in raw):
            rows = [raw]                                   # one environment step: B = 1
        elif all(isinstance(r, list) for r in raw):
            rows = raw
            if not all(r and all(_is_number(v) for v in r) for r in rows):
                return "bad_logits"
            if len({len(r) for r in rows}) != 1:
                return "bad_logits"
        else:
            return "bad_logits"
        if len(rows) > self.c.max_batch or len(rows[0]) > self.c.max_actions:
            return "bad_logits"
        return np.array(rows, dtype=np.float64)

    def _window(self, msg: Message, now_ms: int) -> str | None:
        c = self.c
        if c.roster and msg.model not in c.roster:
            return "unknown_model"
        shape = (int(msg.rows.shape[0]), int(msg.rows.shape[1]))
        win = self.open.get(msg.key)
        repeat = False
        if win is None:
            if c.key and msg.key in self.closed_keys:
                return "late"
            if len(self.open) >= c.max_open:
                _, oldest = self.open.popitem(last=False)
                self._close(oldest, "evicted")
            win = self.open[msg.key] = Window(msg.key, now_ms, shape)
        elif msg.model in win.logits:
            if c.key:
                return "duplicate"
            if shape != win.shape:
                return "shape"
            repeat = True
        elif shape != win.shape:
            return "shape"
        win.logits[msg.model] = msg.rows
        self.accepted_ids.add(msg.model)
        # "Models echo the environment's flag ...; the message that completes the window
        # decides": the last accepted message's flag, or the config default.
        win.deterministic = msg.deterministic
        if repeat:
            self.rejected["duplicate"] += 1  # lockstep: accepted, and counted
        if len(win.logits) >= c.expected:
            del self.open[msg.key]
            self._close(win, "complete")
        return None

    def expire(self, now_ms: int) -> None:
        if not self.c.timeout_ms:
            return
        for key, win in list(self.open.items()):
            if win.opened_ms + self.c.timeout_ms > now_ms:
                break  # opened in time order: the rest are due later
            del self.open[key]
            self._close(win, "partial")

    def _close(self, win: Window, outcome: str) -> None:
        c = self.c
        models = set(win.logits)
        publish = outcome == "complete" or len(models) >= c.min_models
        if outcome == "partial" and not publish:
            outcome = "dropped"
        self.outcomes[outcome] += 1
        if c.key and c.late_memory:
            self.closed_keys[win.key] = None
            if len(self.closed_keys) > c.late_memory:
                self.closed_keys.popitem(last=False)
        if not c.roster:
            for m in win.logits:  # in the order they joined the window
                self.seen[m] = None
                self.seen.move_to_end(m)
            while len(self.seen) > c.expected:
                self.seen.popitem(last=False)
        self.ledger.miss(self.seen.keys() - models)
        action = self._decide(win, outcome) if publish else None
        self.closures.append(Closure(win.key, outcome, tuple(win.logits), action))

    def _decide(self, win: Window, outcome: str) -> dict[str, Any]:
        det = self.c.deterministic if win.deterministic is None else win.deterministic
        if not det:
            raise AssertionError("the model predicts deterministic windows only")
        names = list(win.logits)
        x = np.stack([win.logits[m] for m in names])           # (M, B, A)
        total, action, credit = sum_probs(x)
        if not clear_winner(total, MARGIN):
            raise AssertionError(f"generator let window {win.key!r} tie: {total.tolist()}")
        agree = x.argmax(axis=-1) == action[None, :]
        self.ledger.book(names, credit, agree)
        msg: dict[str, Any] = {"ACTION": action.tolist()}
        msg.update(zip(self.c.key, win.key))
        if outcome != "complete":
            msg["PARTIAL"] = True
            msg["MODELS"] = len(names)
        self.published += 1
        self.env_steps += int(x.shape[1])
        self.actions.append(msg)
        return msg

    # -- evolution -------------------------------------------------------------------------

    def _command(self, payload: bytes) -> None:
        # Only GET / PEEK / RESET are commands; "every other message on that topic is
        # ignored" (WEIGHTS, CMD: SET, CMD of another type, the worker's own replies).
        try:
            obj = json.loads(payload)
        except ValueError:
            raise AssertionError("the model is given readable evolution messages only"
                                 ) from None
        if not isinstance(obj, dict):
            return
        cmd = obj.get("CMD")
        if not isinstance(cmd, str) or cmd not in COMMANDS:
            return
        rid = obj.get("REQUEST_ID")
        rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
        if cmd == "RESET":
            self.ledger.reset()
            return
        if cmd == "GET":
            reply = dict(self.ledger.get(rid))
        else:
            reply = self.ledger.report()
        if rid is not None:
            reply["REQUEST_ID"] = rid
        self.replies.append(reply)
