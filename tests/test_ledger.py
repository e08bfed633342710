"""The ledger's bound: at most max_models models hold a place; the books still balance."""

from __future__ import annotations

import numpy as np
import pytest

from processor.ledger import Ledger


def book(led: Ledger, windows: list[list[str]], credit: float = 0.5):
    """Windows of two models each, as the worker books one burst (W, M, B=1)."""
    c = np.full((len(windows), 2, 1), credit)
    agree = np.zeros((len(windows), 2, 1), dtype=bool)
    agree[:, 0] = True
    return led.add_many(windows, c, agree)


def test_invented_ids_fold_into_the_overflow_and_regulars_keep_their_place():
    led = Ledger(max_models=4)
    for i in range(1000):
        book(led, [["regular", f"id{i}"]])
    assert len(led.names) <= 4 and "regular" in led.names
    r = led.report()
    assert r["CONTRIBUTION"]["regular"] == pytest.approx(500)
    assert r["AGREEMENT"]["regular"] == 1.0
    assert r["STEPS"] == 1000
    assert r["OVERFLOW"]["MODELS"] == 1000 - 3
    total = sum(r["CONTRIBUTION"].values()) + r["OVERFLOW"]["CONTRIBUTION"]
    assert total == pytest.approx(1000)
    assert r["OVERFLOW"]["STEPS"] == 1000 - 3   # the folded ids' steps taken part in


def test_a_burst_with_more_models_than_places_books_the_rest_as_overflow():
    led = Ledger(max_models=3)
    per = book(led, [[f"a{i}", f"b{i}"] for i in range(5)])
    # the metrics still get each model's own sums, overflow or not
    assert sorted(n for n, *_ in per) == sorted([f"a{i}" for i in range(5)]
                                                + [f"b{i}" for i in range(5)])
    assert all(c == pytest.approx(0.5) and s == 1 for _, c, s, _ in per)
    r = led.report()
    assert len(r["CONTRIBUTION"]) == 3
    assert r["OVERFLOW"]["CONTRIBUTION"] == pytest.approx(3.5)


def test_missed_names_at_most_max_models():
    led = Ledger(max_models=2)
    led.miss(["a", "b", "c"])
    led.miss(["a", "d"])
    assert led.report()["MISSED"] == {"a": 2, "b": 1}


def test_a_new_period_starts_with_no_places_taken():
    led = Ledger(max_models=2)
    for i in range(10):
        book(led, [[f"x{i}", f"y{i}"]])
    taken = led.take()
    assert "OVERFLOW" in taken
    assert led.names == [] and led.report()["CONTRIBUTION"] == {}
    book(led, [["a", "b"]])
    assert led.report()["CONTRIBUTION"] == {"a": 0.5, "b": 0.5}
    assert "OVERFLOW" not in led.report()
