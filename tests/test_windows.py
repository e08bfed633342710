"""Windows: pure tests with the clock as an argument; no event loop, no sleeps."""

from __future__ import annotations

import numpy as np
import pytest

from processor.config import WindowConfig
from processor.errors import RejectedError
from processor.messages import Logits
from processor.window import COMPLETE, DROPPED, EVICTED, PARTIAL, Windows


def msg(model: str, key: tuple = (), a: int = 3, b: int = 1, det: bool | None = None,
        extra: dict | None = None) -> Logits:
    return Logits(model, np.zeros((b, a), dtype=np.float32), det, key, extra)


def test_lockstep_closes_when_every_expected_model_sent():
    w = Windows(WindowConfig(models=3, timeout_ms=0))
    assert w.add(msg("a"), 0.0) == []
    assert w.add(msg("b"), 0.1) == []
    (c,) = w.add(msg("c", det=True), 0.2)
    assert c.outcome == COMPLETE and not c.partial and c.publish
    assert list(c.window.models) == ["a", "b", "c"]
    assert c.window.deterministic is True  # the completing message decides
    assert c.window.first_at == 0.0 and c.window.last_at == 0.2
    assert len(w) == 0
    # the next step starts a new window with the same (empty) key: no "late" in lockstep
    assert w.add(msg("a"), 0.3) == []
    assert len(w) == 1


def test_keyed_windows_interleave_across_environments():
    w = Windows(WindowConfig(models=2, key=["ENV_ID", "STEP"], timeout_ms=0))
    order = [("m1", ("e1", 0)), ("m1", ("e2", 0)), ("m1", ("e1", 1)), ("m2", ("e2", 0)),
             ("m2", ("e1", 1)), ("m2", ("e1", 0))]
    closed = []
    for i, (m, k) in enumerate(order):
        closed += [c.window.key for c in w.add(msg(m, k), float(i))]
    assert closed == [("e2", 0), ("e1", 1), ("e1", 0)]
    assert len(w) == 0


def test_keyed_duplicate_is_rejected_and_the_window_goes_on():
    w = Windows(WindowConfig(models=2, key=["STEP"], timeout_ms=0))
    first = msg("a", (1,))
    w.add(first, 0.0)
    with pytest.raises(RejectedError) as e:
        w.add(msg("a", (1,)), 0.1)
    assert e.value.reason == "duplicate"
    (c,) = w.add(msg("b", (1,)), 0.2)
    assert c.outcome == COMPLETE and c.window.models["a"] is first.logits


def test_lockstep_repeat_replaces_the_older_logits_as_the_seed():
    w = Windows(WindowConfig(models=2, timeout_ms=0))
    w.add(msg("a", extra={"ROOT_ID": "old"}), 0.0)
    newer = msg("a", extra={"ROOT_ID": "new"})
    assert w.add(newer, 0.1) == []
    assert w.replaced == 1
    with pytest.raises(RejectedError):
        w.add(msg("a", a=4), 0.15)       # a repeat of another shape is still refused
    (c,) = w.add(msg("b"), 0.2)
    assert c.window.models["a"] is newer.logits
    assert c.window.extra is None        # the completing message's fields, as the seed


def test_late_message_for_a_closed_window():
    w = Windows(WindowConfig(models=1, key=["STEP"], timeout_ms=0))
    w.add(msg("a", (5,)), 0.0)
    with pytest.raises(RejectedError) as e:
        w.add(msg("b", (5,)), 0.1)
    assert e.value.reason == "late"
    assert len(w) == 0


def test_shape_mismatch_is_rejected():
    w = Windows(WindowConfig(models=3, timeout_ms=0))
    w.add(msg("a", a=4), 0.0)
    with pytest.raises(RejectedError) as e:
        w.add(msg("b", a=5), 0.0)
    assert e.value.reason == "shape"
    with pytest.raises(RejectedError) as e:
        w.add(msg("c", a=4, b=2), 0.0)
    assert e.value.reason == "shape"
    assert list(w.open[()].models) == ["a"]


def test_roster_rejects_unknown_models_and_completes_on_the_roster():
    w = Windows(WindowConfig(models=0, model_ids=["x", "y"], timeout_ms=0))
    with pytest.raises(RejectedError) as e:
        w.add(msg("z"), 0.0)
    assert e.value.reason == "unknown_model"
    w.add(msg("y"), 0.0)
    (c,) = w.add(msg("x"), 0.0)
    assert c.outcome == COMPLETE


def test_deadline_publishes_partial_with_quorum_and_drops_without():
    w = Windows(WindowConfig(models=4, key=["STEP"], timeout_ms=100, min_models=2))
    w.add(msg("a", (1,)), 0.0)
    w.add(msg("b", (1,)), 0.01)
    w.add(msg("a", (2,)), 0.05)
    assert w.next_deadline() == pytest.approx(0.1)
    assert w.expire(0.099) == []
    (c,) = w.expire(0.1)
    assert c.window.key == (1,) and c.outcome == PARTIAL and c.publish and c.partial
    (d,) = w.expire(0.2)
    assert d.window.key == (2,) and d.outcome == DROPPED and not d.publish
    assert w.next_deadline() is None
    with pytest.raises(RejectedError):  # late after its deadline
        w.add(msg("c", (1,)), 0.3)


def test_timeout_zero_waits_forever():
    w = Windows(WindowConfig(models=2, timeout_ms=0))
    w.add(msg("a"), 0.0)
    assert w.next_deadline() is None
    assert w.expire(1e9) == []


def test_cap_closes_the_oldest_window_first():
    w = Windows(WindowConfig(models=3, key=["STEP"], timeout_ms=0, max_open=2, min_models=2))
    w.add(msg("a", (1,)), 0.0)
    w.add(msg("b", (1,)), 0.0)
    w.add(msg("a", (2,)), 0.1)
    (c,) = w.add(msg("a", (3,)), 0.2)   # opening a third closes (1,): has its quorum
    assert c.window.key == (1,) and c.outcome == EVICTED and c.publish and c.partial
    (d,) = w.add(msg("a", (4,)), 0.3)   # then (2,): one model, below quorum
    assert d.window.key == (2,) and d.outcome == EVICTED and not d.publish
    assert list(w.open) == [(3,), (4,)]


def test_late_memory_is_bounded():
    w = Windows(WindowConfig(models=1, key=["STEP"], timeout_ms=0, late_memory=10))
    for s in range(100):
        w.add(msg("a", (s,)), float(s))
    assert len(w.closed_keys) == 10
    with pytest.raises(RejectedError):
        w.add(msg("a", (99,)), 100.0)


def test_recent_membership_learns_the_models_then_completes_on_them():
    cfg = WindowConfig(models=0, key=["STEP"], timeout_ms=500, recent_s=1.0)
    w = Windows(cfg, start=0.0)
    # warm-up: windows close at their deadline, as complete when they hold every known model
    w.add(msg("a", (0,)), 0.0)
    w.add(msg("b", (0,)), 0.0)
    (c,) = w.expire(0.5)
    assert c.outcome == COMPLETE
    # after warm-up, a window holding every recently seen model closes at once
    assert w.add(msg("a", (1,)), 1.0) == []  # b (seen at 0.0) is still recent
    (c,) = w.add(msg("b", (1,)), 1.0)
    assert c.outcome == COMPLETE
    # b goes silent: while it is recent, windows wait for it; after recent_s they do not
    assert w.add(msg("a", (2,)), 1.5) == []
    (p,) = w.expire(2.0)
    assert p.outcome == PARTIAL
    (c,) = w.add(msg("a", (3,)), 2.5)       # b last seen at 1.0 < 2.5 - 1.0
    assert c.outcome == COMPLETE


def test_close_all_publishes_quorum_and_drops_the_rest():
    w = Windows(WindowConfig(models=3, key=["STEP"], timeout_ms=0, min_models=2))
    w.add(msg("a", (1,)), 0.0)
    w.add(msg("b", (1,)), 0.0)
    w.add(msg("a", (2,)), 0.0)
    outs = {c.window.key: c.outcome for c in w.close_all()}
    assert outs == {(1,): PARTIAL, (2,): DROPPED}
    assert len(w) == 0
