"""The intake proven against a model: a stateful property test of the real worker.

Hypothesis drives a real `Worker` through the memory transport, as the run loop does
(`batch = await transport.receive(...)`, then `await worker.handle(batch)`), with an injected
clock. It interleaves valid windows, duplicates, late messages, malformed messages, shape
changes, bursts of new model ids, deadlines passing and the evolution commands (GET with and
without REQUEST_ID, PEEK, RESET, and traffic to ignore), under keyed and lockstep windows.
`tests/model.py`, written from the contract alone, predicts every action, every rejection
(reason and count), every window outcome and every evolution reply; invariants are checked
after every step.

One machine per window configuration (CONFIGS). By default each runs a fixed search of
bounded time (16 examples of up to 40 steps; about 3,400 steps and 30 s of CPU in all, as
part of `make test`), and a failure is reported as found, unshrunk. For longer, random runs,
which shrink what they find:

    SWARM_AGG_STATEFUL_EXAMPLES=500 .venv/bin/python -m pytest -q tests/test_stateful.py

(examples per configuration; `SWARM_AGG_STATEFUL_STEPS` sets the steps per example,
`SWARM_AGG_STATEFUL_SEED` fixes the seed of a random run, `SWARM_AGG_STATEFUL_SHRINK=1`
shrinks a failure of the default search.)
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Coroutine, Sized
from typing import Any, TypeVar

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from prometheus_client import CollectorRegistry

from processor.config import from_mapping
from processor.metrics import Metrics
from processor.worker import Worker
from tests.model import MARGIN, OUTCOMES, REASONS, REMEMBERED_REQUESTS, Contract, Reference
from tests.reference import clear_winner, softmax
from transports.memory import MemoryBus, MemoryTransport

T = TypeVar("T")

EXAMPLES = int(os.environ.get("SWARM_AGG_STATEFUL_EXAMPLES", "0"))
STEPS = int(os.environ.get("SWARM_AGG_STATEFUL_STEPS", "0"))
SEED = os.environ.get("SWARM_AGG_STATEFUL_SEED")
SHRINK = bool(os.environ.get("SWARM_AGG_STATEFUL_SHRINK"))
LONG = bool(EXAMPLES or STEPS or SEED)

# A long run has no time limit; the default run stays well inside the suite's.
pytestmark = pytest.mark.timeout(0 if LONG else 120)

BASE: dict[str, Any] = {
    "transport": {"kind": "memory"},
    "metrics": {"port": 0},
    "aggregate": {"deterministic": True},
    # Small limits, so that "over the limit" is cheap to send.
    "limits": {"max_message_bytes": 2048, "max_actions": 6, "max_batch": 3},
}
# Timeouts and clock steps are multiples of 1/8 s: every deadline is exact in binary, so
# "at the deadline" is tested at the instant itself.
CONFIGS: dict[str, dict[str, Any]] = {
    "keyed": {"key": ["STEP"], "models": 3, "timeout_ms": 500, "min_models": 2,
              "max_open": 3, "late_memory": 6},
    "keyed_roster": {"key": ["ENV_ID", "STEP"], "model_ids": ["m0", "m1", "m2", "7"],
                     "timeout_ms": 250, "min_models": 1, "max_open": 2, "late_memory": 4},
    "keyed_forever": {"key": ["STEP"], "models": 2, "timeout_ms": 0, "min_models": 2,
                      "max_open": 4, "late_memory": 3},
    "keyed_no_memory": {"key": ["STEP"], "models": 2, "timeout_ms": 250, "min_models": 1,
                        "max_open": 2, "late_memory": 0},
    "lockstep": {"key": [], "models": 3, "timeout_ms": 500, "min_models": 2},
    "lockstep_forever": {"key": [], "models": 2, "timeout_ms": 0},
}
POOL: tuple[str | int, ...] = ("m0", "m1", "m2", "m3", 7)  # 7 goes as 7 or "7": one model
SHAPES = ((1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (3, 2))  # (B, A) within the limits
REQUEST_IDS: tuple[str | int, ...] = ("r0", "r1", "r2", 5, 6)  # fewer than remembered
CLOCK_STEPS_MS = (125, 250, 375, 500, 625, 1000)
assert len(REQUEST_IDS) < REMEMBERED_REQUESTS  # forgetting an id is not under test

# Kinds of messages in a burst ("command" and "ignored" go to the evolution topic); "valid"
# first, so that shrinking prefers it.
KINDS = ("valid", "valid", "valid", "duplicate", "late", "shape", "malformed", "command",
         "ignored")
MALFORMED: dict[str, list[Any]] = {
    "bad_component_id": [None, True, False, "", [1], {"a": 1}],
    "bad_logits": ["x", [], [1, "a"], [1, None], [[1, 2], [3]], [[[1, 2]]], [[]], [1, [2]],
                   {"a": 1}, [True, False], [[0.5, True]], [0.5] * 7,
                   [[0.5, 1.5]] * 4],
    "bad_deterministic": ["yes", 1, 0, [], {}, "true"],
    "bad_key": [1.5, True, None, [1], {"s": 1}],
}
NOT_JSON = (b"garbage", b'{"LOGITS": [1, 2], "COMPONENT_ID": "m0"', b"{'LOGITS': [1]}", b"",
            b'{"LOGITS": [NaN, 1], "COMPONENT_ID": "m0"}',
            b'{"LOGITS": [-Infinity, 1], "COMPONENT_ID": "m0"}')
NOT_OBJECT = (b"[1, 2]", b'"LOGITS"', b"3", b"null")
# Evolution traffic that is not a command for the worker, by name (short failure reports).
IGNORED: dict[str, Any] = {
    "large WEIGHTS": {"WEIGHTS": [0.5] * 600, "COMPONENT_ID": 1},  # over the byte limit
    "CMD SET": {"CMD": "SET", "WEIGHTS": [1, 2]}, "CMD get": {"CMD": "get"},
    "CMD 5": {"CMD": 5}, "CMD null": {"CMD": None}, "CMD []": {"CMD": []},
    "CMD {}": {"CMD": {"x": 1}}, "no CMD": {"NOTE": "hello"},
}


def _mapping(name: str) -> dict[str, Any]:
    out = {k: dict(v) for k, v in BASE.items()}
    out["window"] = dict(CONFIGS[name])
    return out


def state_sizes(worker: Worker) -> dict[str, int]:
    """Sizes of the worker's per-peer state, by name; what does not exist is left out.

    Extend this as state is added; `state_bounds` says what each may hold.
    """
    probes: dict[str, Callable[[], Sized]] = {
        "windows": lambda: worker.windows,
        "windows.closed_keys": lambda: worker.windows.closed_keys,
        "windows.last_seen": lambda: worker.windows.last_seen,
        "known": lambda: worker.known,
        "ledger.names": lambda: worker.ledger.names,
        "ledger.missed": lambda: worker.ledger.missed,
        "ledger.answered": lambda: worker.ledger._answered,
        "rejects.last": lambda: worker.rejects.last,
        "rejects.held": lambda: worker.rejects.held,
        "metrics.labels": lambda: worker.metrics._labels,
    }
    sizes: dict[str, int] = {}
    for name, probe in probes.items():
        try:
            sizes[name] = len(probe())
        except AttributeError:
            continue
    return sizes


def state_bounds(c: Contract, model: Reference) -> dict[str, int]:
    """What the contract allows each of `state_sizes` to hold at most."""
    # Ids that ever had logits in a window: a rejected message leaves no trace.
    ids = min(len(model.accepted_ids | c.roster), c.max_models)
    return {
        "windows": c.max_open if c.key else 1,  # lockstep: one window at a time
        "windows.closed_keys": c.late_memory if c.key else 0,
        "windows.last_seen": ids,
        "known": min(ids, c.expected or c.max_models),
        "ledger.names": ids,
        "ledger.missed": ids,
        "ledger.answered": REMEMBERED_REQUESTS,
        "rejects.last": len(REASONS),
        "rejects.held": len(REASONS),
        "metrics.labels": c.label_models,
    }


def _json(payload: object) -> dict[str, Any]:
    assert isinstance(payload, bytes), payload  # the worker publishes JSON bytes
    obj = orjson.loads(payload)
    assert isinstance(obj, dict), obj
    return obj


def _canonical(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True)


def same_reply(got: dict[str, Any], want: dict[str, Any]) -> None:
    """An evolution reply against the model's: exact but for float sums of float32 credit."""
    assert set(want) <= set(got), (got, want)
    tol = 1e-5 * max(1, want["STEPS"])
    assert set(got["CONTRIBUTION"]) == set(want["CONTRIBUTION"]), (got, want)
    for m, v in want["CONTRIBUTION"].items():
        assert got["CONTRIBUTION"][m] == pytest.approx(v, abs=tol), (m, got, want)
    assert set(got["AGREEMENT"]) == set(want["AGREEMENT"]), (got, want)
    for m, v in want["AGREEMENT"].items():
        assert got["AGREEMENT"][m] == pytest.approx(v, abs=1e-12), (m, got, want)
    for k in want:
        if k not in ("CONTRIBUTION", "AGREEMENT"):
            assert got[k] == want[k], (k, got, want)


class Intake(RuleBasedStateMachine):
    """One worker, one model, the same bytes to both; `config` names one of CONFIGS."""

    config = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.now_ms = 0
        self.fresh = 0          # new model ids handed out so far
        self.next_step = 0      # new step keys handed out so far
        self.ever_closed: list[tuple[Any, ...]] = []  # late candidates, remembered or not
        self.transport: MemoryTransport | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    @initialize()
    def start(self) -> None:
        mapping = _mapping(self.config)
        cfg = from_mapping(mapping)
        self.c = Contract.from_mapping(mapping)
        self.model = Reference(self.c)
        self.bus = MemoryBus()
        self.metrics = Metrics(CollectorRegistry(), max_models=cfg.metrics.max_models,
                               process=False)
        self.transport = MemoryTransport(cfg, lambda reason, detail: None, bus=self.bus)
        self.worker = Worker(cfg, self.transport, self.metrics,
                             clock=lambda: self.now_ms / 1000)
        self.run(self.transport.__aenter__())
        self.actions = self.bus.subscribe(cfg.topics.action)
        self.evolution = self.bus.subscribe(cfg.topics.evolution)

    def teardown(self) -> None:
        if self.transport is not None:
            self.run(self.transport.__aexit__(None, None, None))
        self.loop.close()

    # -- building messages -----------------------------------------------------------------

    def _new_key(self, data: st.DataObject) -> tuple[Any, ...]:
        step = self.next_step
        self.next_step += 1
        if len(self.c.key) == 2:
            return (data.draw(st.sampled_from(("e0", "e1"))), step)
        return (step,)

    def _target(self, data: st.DataObject) -> tuple[Any, ...]:
        """An open window's key, or a new one (lockstep: the one key, ())."""
        if not self.c.key:
            return ()
        options = list(self.model.open)
        i = data.draw(st.integers(0, len(options)))
        return options[i] if i < len(options) else self._new_key(data)

    def _wire_id(self, data: st.DataObject, model: str | int) -> str | int:
        if model == 7:
            forms: list[str | int] = [7, "7"]  # "a number is accepted and made a string"
            return data.draw(st.sampled_from(forms))
        return model

    def _pick_model(self, data: st.DataObject, key: tuple[Any, ...], inside: bool
                    ) -> str | int:
        """A pool model, preferring (inside=False) those the window does not hold yet."""
        win = self.model.open.get(key)
        held = set(win.logits) if win is not None else set()
        first = [m for m in POOL if (str(m) in held) == inside]
        rest = [m for m in POOL if (str(m) in held) != inside]
        return data.draw(st.sampled_from(first + rest))

    def _rows(self, data: st.DataObject, key: tuple[Any, ...], model: str,
              shape: tuple[int, int]) -> list[list[float]]:
        """Distinct logits per row, such that the window keeps a clear winner.

        The other models' P is known (the model tracks the window); when this row would
        leave the top two within MARGIN, its maximum moves to their best action and grows,
        which adds almost 1 to that action and nothing to the others.
        """
        b, a = shape
        ctx = self.model.others(key, model)
        base = ctx[1] if ctx is not None and ctx[0] == shape else None
        rows = []
        for i in range(b):
            perm = data.draw(st.permutations(range(-4, 5)))
            row = np.array(perm[:a], dtype=np.float64) / 2
            if base is not None and not clear_winner((base[i] + softmax(row))[None], MARGIN):
                t, j = int(base[i].argmax()), int(row.argmax())
                row[[t, j]] = row[[j, t]]
                row[t] += 8.0
            rows.append(row.tolist())
        return rows

    def _logits_message(self, data: st.DataObject, key: tuple[Any, ...], model: str | int,
                        shape: tuple[int, int]) -> dict[str, Any]:
        rows = self._rows(data, key, str(model), shape)
        flat = shape[0] == 1 and data.draw(st.booleans())  # B = 1 either way
        msg: dict[str, Any] = {"LOGITS": rows[0] if flat else rows,
                               "COMPONENT_ID": self._wire_id(data, model)}
        msg.update(zip(self.c.key, key))
        if data.draw(st.booleans()):
            msg["DETERMINISTIC"] = True  # else the config default (true) decides
        return msg

    def _shape_of(self, data: st.DataObject, key: tuple[Any, ...]) -> tuple[int, int]:
        win = self.model.open.get(key)
        return win.shape if win is not None else data.draw(st.sampled_from(SHAPES))

    def _valid(self, data: st.DataObject) -> dict[str, Any]:
        key = self._target(data)
        model = self._pick_model(data, key, inside=False)
        return self._logits_message(data, key, model, self._shape_of(data, key))

    def _malformed(self, data: st.DataObject) -> bytes:
        kinds = ["not_json", "not_object", "missing_field", "too_large", *MALFORMED]
        if not self.c.key:
            kinds.remove("bad_key")  # lockstep reads no key fields
        kind = data.draw(st.sampled_from(kinds))
        if kind == "not_json":
            return data.draw(st.sampled_from(NOT_JSON))
        if kind == "not_object":
            return data.draw(st.sampled_from(NOT_OBJECT))
        # One defect in an otherwise valid message from a roster model.
        key = self._target(data)
        msg = self._logits_message(data, key, "m0", self._shape_of(data, key))
        if kind == "missing_field":
            del msg[data.draw(st.sampled_from(("LOGITS", "COMPONENT_ID")))]
        elif kind == "too_large":
            msg["PAD"] = "x" * self.c.max_message_bytes
        elif kind == "bad_component_id":
            msg["COMPONENT_ID"] = data.draw(st.sampled_from(MALFORMED[kind]))
        elif kind == "bad_logits":
            msg["LOGITS"] = data.draw(st.sampled_from(MALFORMED[kind]))
        elif kind == "bad_deterministic":
            msg["DETERMINISTIC"] = data.draw(st.sampled_from(MALFORMED[kind]))
        else:  # bad_key: one key field absent or of a type no key has
            field = data.draw(st.sampled_from(self.c.key))
            if data.draw(st.booleans()):
                del msg[field]
            else:
                msg[field] = data.draw(st.sampled_from(MALFORMED[kind]))
        return orjson.dumps(msg)

    def _command(self, data: st.DataObject) -> dict[str, Any]:
        cmd = data.draw(st.sampled_from(("GET", "GET", "PEEK", "RESET")))
        msg: dict[str, Any] = {"CMD": cmd}
        if cmd != "RESET" and data.draw(st.booleans()):
            msg["REQUEST_ID"] = data.draw(st.sampled_from(REQUEST_IDS))
        return msg

    def _build(self, kind: str, data: st.DataObject) -> tuple[str, bytes]:
        c = self.c
        if kind == "command":
            return "evolution", orjson.dumps(self._command(data))
        if kind == "ignored":
            return "evolution", orjson.dumps(IGNORED[data.draw(st.sampled_from(list(IGNORED)))])
        if kind == "malformed":
            return "logits", self._malformed(data)
        if kind == "duplicate" and self.model.open:
            key = data.draw(st.sampled_from(list(self.model.open)))
            model = self._pick_model(data, key, inside=True)
            return "logits", orjson.dumps(self._logits_message(
                data, key, model, self._shape_of(data, key)))
        if kind == "late" and c.key and self.ever_closed:
            # Remembered keys and a few forgotten ones (those open a window again).
            key = data.draw(st.sampled_from(self.ever_closed[-2 * c.late_memory - 2:]))
            model = self._pick_model(data, key, inside=False)
            return "logits", orjson.dumps(self._logits_message(
                data, key, model, self._shape_of(data, key)))
        if kind == "shape" and (self.model.open or not c.key):
            key = data.draw(st.sampled_from(list(self.model.open))) if c.key else ()
            win = self.model.open.get(key)
            shapes = [s for s in SHAPES if win is None or s != win.shape]
            model = self._pick_model(data, key, inside=False)
            return "logits", orjson.dumps(self._logits_message(
                data, key, model, data.draw(st.sampled_from(shapes))))
        return "logits", orjson.dumps(self._valid(data))

    # -- driving ---------------------------------------------------------------------------

    def _feed(self, out: list[tuple[str, bytes]], topic: str, payload: bytes) -> None:
        self.model.receive(topic, payload, self.now_ms)
        out.append((topic, payload))

    def send(self, burst: list[tuple[str, dict[str, Any] | bytes]]) -> None:
        """One burst, given message by message (for replays written by hand)."""
        out: list[tuple[str, bytes]] = []
        for topic, msg in burst:
            self._feed(out, topic, msg if isinstance(msg, bytes) else orjson.dumps(msg))
        self.deliver(out)
        self.check()

    def deliver(self, out: list[tuple[str, bytes]]) -> None:
        """Publish a burst, let the worker take it as its loop does, compare with the model."""
        sent = []
        for topic, payload in out:
            self.bus.publish(topic, payload)
            if topic == "evolution":
                sent.append(payload)
        assert self.transport is not None
        batch = self.run(self.transport.receive(0))
        assert len(batch) >= len(out)  # plus the worker's own replies, read back
        # The bus stamps received_at with time.monotonic(); the worker opens a window at
        # that stamp but expires it on its own clock, so with an injected clock the stamp
        # must come from that clock too: the envelope as read at this instant.
        at = self.now_ms / 1000
        self.run(self.worker.handle([(t, p, at, tok) for t, p, _, tok in batch]))
        want_actions, want_replies, closures = self.model.take()
        if self.c.key:
            self.ever_closed += [c.key for c in closures]
        got_actions = [_json(e[1]) for e in self.actions.drain()]
        assert sorted(map(_canonical, got_actions)) == sorted(map(_canonical, want_actions))
        evo = [e[1] for e in self.evolution.drain()]
        assert evo[:len(sent)] == sent
        got_replies = [_json(p) for p in evo[len(sent):]]
        assert len(got_replies) == len(want_replies), (got_replies, want_replies)
        for got, want in zip(got_replies, want_replies):
            same_reply(got, want)

    @rule(data=st.data())
    def burst(self, data: st.DataObject) -> None:
        """A few messages of any kind, received together."""
        out: list[tuple[str, bytes]] = []
        for _ in range(data.draw(st.integers(1, 8), label="messages")):
            kind = data.draw(st.sampled_from(KINDS), label="kind")
            self._feed(out, *self._build(kind, data))
        self.deliver(out)

    @rule(data=st.data())
    def new_ids(self, data: st.DataObject) -> None:
        """A burst of model ids never seen before, all for one step."""
        key = self._target(data)
        shape = self._shape_of(data, key)
        out: list[tuple[str, bytes]] = []
        for _ in range(data.draw(st.integers(2, 10), label="new ids")):
            model = f"n{self.fresh}"
            self.fresh += 1
            # The window may have closed meanwhile: then a new one opens with this shape
            # (lockstep, or keyed without late memory) or the message is late.
            msg = self._logits_message(data, key, model, shape)
            self._feed(out, "logits", orjson.dumps(msg))
        self.deliver(out)

    @rule(data=st.data())
    def evolution_command(self, data: st.DataObject) -> None:
        out: list[tuple[str, bytes]] = []
        self._feed(out, "evolution", orjson.dumps(self._command(data)))
        self.deliver(out)

    @rule(dt=st.sampled_from(CLOCK_STEPS_MS))
    def wait(self, dt: int) -> None:
        """Time passes; the loop wakes (an empty burst) and closes what is due."""
        self.now_ms += dt
        self.model.expire(self.now_ms)
        self.deliver([])

    @rule(data=st.data(), dt=st.sampled_from(CLOCK_STEPS_MS))
    def burst_after_deadline(self, data: st.DataObject, dt: int) -> None:
        """Time passes while the loop is busy: the next burst is read after a deadline.

        In production this is a loop that handled a long burst (or was paused) past the
        next deadline: `receive` returns the queued messages at once. The contract closes
        a window at its deadline, so what is received later cannot join it, and a GET
        received later counts it.
        """
        self.now_ms += dt
        self.burst(data)

    # -- invariants ------------------------------------------------------------------------

    def _sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    @invariant()
    def rejections_and_outcomes_match_the_model(self) -> None:
        for r in REASONS:
            got = self._sample("swarm_aggregator_messages_rejected_total", {"reason": r})
            assert got == self.model.rejected[r], (r, got, self.model.rejected[r])
        for o in OUTCOMES:
            got = self._sample("swarm_aggregator_windows_closed_total", {"outcome": o})
            assert got == self.model.outcomes[o], (o, got, self.model.outcomes[o])
        # Whatever reasons the worker has beyond the model's, it refuses no more messages.
        total = 0.0
        for family in self.metrics.registry.collect():
            if family.name == "swarm_aggregator_messages_rejected":
                total += sum(s.value for s in family.samples if s.name.endswith("_total"))
        assert total == sum(self.model.rejected.values())
        # One action per window closed with its quorum, one decided step per environment.
        assert self._sample("swarm_aggregator_actions_published_total") == self.model.published
        assert self._sample("swarm_aggregator_environment_steps_total") == self.model.env_steps

    @invariant()
    def credits_of_each_step_sum_to_one(self) -> None:
        total = 0.0
        for family in self.metrics.registry.collect():
            if family.name == "swarm_aggregator_contribution":
                total += sum(s.value for s in family.samples if s.name.endswith("_total"))
        steps = self.model.env_steps
        assert total == pytest.approx(steps, abs=1e-5 * max(1, steps))

    @invariant()
    def open_windows_are_capped(self) -> None:
        n = len(self.worker.windows)
        assert n == len(self.model.open)
        assert n <= self.c.max_open
        assert self._sample("swarm_aggregator_open_windows") == n

    @invariant()
    def internal_state_is_bounded(self) -> None:
        bounds = state_bounds(self.c, self.model)
        for name, size in state_sizes(self.worker).items():
            if name in bounds:
                assert size <= bounds[name], (name, size, bounds[name])

    def check(self) -> None:
        self.rejections_and_outcomes_match_the_model()
        self.credits_of_each_step_sum_to_one()
        self.open_windows_are_capped()
        self.internal_state_is_bounded()


SETTINGS = settings(
    max_examples=EXAMPLES or 16,
    stateful_step_count=STEPS or 40,
    deadline=None,
    derandomize=not LONG,            # the default run is the same search every time
    database=settings().database if LONG else None,
    # Shrinking replays the worker thousands of times: minutes. The default run reports the
    # failing sequence as found; SWARM_AGG_STATEFUL_SHRINK=1 replays the same search and
    # shrinks it (long runs always shrink).
    phases=[p for p in Phase if p is not Phase.shrink or LONG or SHRINK],
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)


# One machine per configuration, so that each gets its share of the search.
class KeyedIntake(Intake):
    config = "keyed"


class KeyedRosterIntake(Intake):
    config = "keyed_roster"


class KeyedForeverIntake(Intake):
    config = "keyed_forever"


class KeyedNoMemoryIntake(Intake):
    config = "keyed_no_memory"


class LockstepIntake(Intake):
    config = "lockstep"


class LockstepForeverIntake(Intake):
    config = "lockstep_forever"


MACHINES: dict[str, type[Intake]] = {m.config: m for m in (
    KeyedIntake, KeyedRosterIntake, KeyedForeverIntake, KeyedNoMemoryIntake, LockstepIntake,
    LockstepForeverIntake)}
assert set(MACHINES) == set(CONFIGS)
for _machine in MACHINES.values():
    _machine.TestCase.settings = SETTINGS
    if SEED is not None:
        seed(int(SEED))(_machine)  # read from the machine class by Hypothesis

TestKeyed = KeyedIntake.TestCase
TestKeyedRoster = KeyedRosterIntake.TestCase
TestKeyedForever = KeyedForeverIntake.TestCase
TestKeyedNoMemory = KeyedNoMemoryIntake.TestCase
TestLockstep = LockstepIntake.TestCase
TestLockstepForever = LockstepForeverIntake.TestCase


# Two divergences the machine finds, replayed by hand at their smallest.


def _replay(name: str) -> Intake:
    machine = MACHINES[name]()
    machine.start()
    return machine


def test_a_window_due_before_a_burst_closes_before_it() -> None:
    m = _replay("keyed")  # 3 models, deadline 500 ms, quorum 2
    try:
        m.send([("logits", {"LOGITS": [0, 1], "COMPONENT_ID": "m0", "STEP": 1}),
                ("logits", {"LOGITS": [0, 1], "COMPONENT_ID": "m1", "STEP": 1})])
        m.now_ms = 500  # step 1 is due; the loop reads its next burst only now
        # Contract: step 1 closed at 500 (PARTIAL, 2 models), so the GET counts it (STEPS 1)
        # and m2's message is late.
        m.send([("evolution", {"CMD": "GET"}),
                ("logits", {"LOGITS": [0, 1], "COMPONENT_ID": "m2", "STEP": 1})])
    finally:
        m.teardown()


def test_booleans_are_not_logits() -> None:
    m = _replay("lockstep")
    try:
        # README, bad_logits: "LOGITS that are not a non-empty list of numbers".
        m.send([("logits", {"LOGITS": [True, False], "COMPONENT_ID": "m0"}),
                ("logits", {"LOGITS": [[0.5, True]], "COMPONENT_ID": "m1"})])
    finally:
        m.teardown()
