"""Exact ties in the input are ties in the score: they go to the lowest action index.

The contract (README "Aggregation"): equal inputs give equal scores whatever the actions'
positions, A, M or the burst a window is aggregated in. Before the sums over the models ran
column by column, torch's float32 reduction added each column in an order set by its SIMD
lane, and about one exact tie in seven went to the higher index (M = 5, A = 6).
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from processor.aggregate import STRATEGIES, create

ACTIONS = (2, 6, 18, 1000)
MODELS = (1, 5, 20, 64)
LONG = bool(os.environ.get("SWARM_AGG_LONG_TESTS"))


def _windows(m: int, a: int, tied: list[list[int]], seed: int) -> np.ndarray:
    """One window per set of tied actions: (W, M, 1, A) float32.

    Model k gives every tied action the same logit t_k, its row's maximum, and every other
    action a lower random one: the tied actions have equal inputs in every model.
    """
    rng = np.random.default_rng(seed)
    w = len(tied)
    top = rng.normal(0.0, 3.0, (w, m, 1, 1)).astype(np.float32)
    x = top - rng.uniform(0.05, 6.0, (w, m, 1, a)).astype(np.float32)
    for i, cols in enumerate(tied):
        x[i][:, :, cols] = top[i]
    return x


def _aggregate_in_bursts(name: str, x: np.ndarray, burst: int) -> tuple[np.ndarray,
                                                                        np.ndarray]:
    """The worker's call: windows of one shape stacked, `burst` windows per call."""
    strategy = create(name)
    actions, credits = [], []
    for s in range(0, len(x), burst):
        chunk = x[s:s + burst]
        act, credit, _ = strategy.aggregate(chunk, np.ones(len(chunk), dtype=bool))
        actions.append(act[:, 0])
        credits.append(credit[:, :, 0])
    return np.concatenate(actions), np.concatenate(credits)


def _pairs(a: int) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(a), 2))


@pytest.mark.parametrize("m", MODELS)
@pytest.mark.parametrize("a", ACTIONS[:3])
def test_every_pair_of_tied_actions_goes_to_the_lower_index(a: int, m: int) -> None:
    pairs = _pairs(a)
    x = _windows(m, a, [list(p) for p in pairs], seed=a * 100 + m)
    for burst in (1, 7, len(pairs)):
        actions, credits = _aggregate_in_bursts("sum_probs", x, burst)
        assert actions.tolist() == [i for i, _ in pairs], f"burst {burst}"
        np.testing.assert_allclose(credits.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("m", MODELS)
def test_every_pair_among_a_thousand_actions(m: int) -> None:
    """Window i ties actions i..A-1: its action must be i, so score[i] >= score[j] for
    every j > i, which covers every pair (i, j) in A windows instead of A(A-1)/2."""
    a = 1000
    tails = [list(range(i, a)) for i in range(a - 1)]
    x = _windows(m, a, tails, seed=m)
    actions, _ = _aggregate_in_bursts("sum_probs", x, 50)
    assert actions.tolist() == list(range(a - 1))
    # And the same windows one at a time: the burst must not change a decision.
    few = np.random.default_rng(m).choice(a - 1, 40, replace=False)
    alone, _ = _aggregate_in_bursts("sum_probs", x[few], 1)
    assert alone.tolist() == few.tolist()


@pytest.mark.parametrize("m", MODELS)
def test_pairs_among_a_thousand_actions_two_at_a_time(m: int) -> None:
    """Pairs of exactly two tied actions, sampled (every pair with SWARM_AGG_LONG_TESTS)."""
    pairs = _pairs(1000)
    if not LONG:
        rng = np.random.default_rng(m)
        pairs = [pairs[i] for i in rng.choice(len(pairs), 400, replace=False)]
    for s in range(0, len(pairs), 200):
        chunk = pairs[s:s + 200]
        x = _windows(m, 1000, [list(p) for p in chunk], seed=s + m)
        actions, _ = _aggregate_in_bursts("sum_probs", x, 64)
        assert actions.tolist() == [i for i, _ in chunk]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_rule_breaks_exact_ties_by_index(name: str) -> None:
    pairs = _pairs(18)
    x = _windows(5, 18, [list(p) for p in pairs], seed=7)
    actions, _ = _aggregate_in_bursts(name, x, len(pairs))
    assert actions.tolist() == [i for i, _ in pairs]
