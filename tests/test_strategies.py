"""Every aggregation rule against an independent numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from processor.aggregate import STRATEGIES, create
from tests.reference import softmax

T = 0.7


def reference(name: str, x: np.ndarray, w: np.ndarray, temperature: float):
    """(score (B, A), policy (B, A), support (M, B, A)) written from the formulas."""
    x = x.astype(np.float64)
    m, b, a = x.shape
    p = softmax(x)
    wp = w[:, None, None] * p
    if name in ("sum_probs", "boltzmann_addition"):
        score = wp.sum(axis=0)
        t = 1.0 if name == "sum_probs" else temperature
        pol = score ** (1.0 / t)
        return score, pol / pol.sum(-1, keepdims=True), wp
    if name == "boltzmann_multiplication":
        score = (w[:, None, None] * x).sum(axis=0)
        # the product of the models' probabilities, tempered, normalised
        logprod = (w[:, None, None] * np.log(p)).sum(axis=0) / temperature
        pol = np.exp(logprod - logprod.max(-1, keepdims=True))
        return score, pol / pol.sum(-1, keepdims=True), wp
    if name == "majority_vote":
        support = np.zeros_like(x)
        for i in range(m):
            for j in range(b):
                support[i, j, int(np.argmax(x[i, j]))] = w[i]
    elif name == "rank_vote":
        support = np.zeros_like(x)
        for i in range(m):
            for j in range(b):
                order = sorted(range(a), key=lambda k: (-x[i, j, k], k))
                for pos, k in enumerate(order):
                    support[i, j, k] = w[i] * (a - pos)
    else:
        raise AssertionError(name)
    score = support.sum(axis=0)
    z = np.exp((score - score.max(-1, keepdims=True)) / temperature)
    return score, z / z.sum(-1, keepdims=True), support


def reference_credit(name, x, w, support, action):
    b = np.arange(x.shape[1])
    chosen = support[:, b, action]
    total = chosen.sum(axis=0)
    fallback = (w[:, None, None] * softmax(x.astype(np.float64)))[:, b, action]
    chosen = np.where(total > 0, chosen, fallback)
    return chosen / chosen.sum(axis=0)


def clear(score, margin=1e-4):
    s = np.sort(score, axis=-1)
    return s.shape[-1] < 2 or bool(((s[..., -1] - s[..., -2]) > margin).all())


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("shape", [(1, 1, 4), (5, 1, 6), (7, 3, 5), (20, 1, 18)])
@pytest.mark.parametrize("weighted", [False, True])
def test_argmax_and_credit_match_the_reference(name, shape, weighted):
    rng = np.random.default_rng(hash((name, shape, weighted)) % 2**32)
    xs = [rng.normal(0, 2, shape).astype(np.float32) for _ in range(60)]
    ws = [rng.uniform(0.2, 2.0, shape[0]).astype(np.float32) if weighted else None
          for _ in xs]
    results = create(name, 0, T)(xs, [True] * len(xs), ws if weighted else None)
    compared = 0
    # unweighted votes are small integers: exact, ties included (to the lowest index)
    exact = name in ("majority_vote", "rank_vote") and not weighted
    for x, w, r in zip(xs, ws, results):
        w = np.ones(shape[0]) if w is None else w.astype(np.float64)
        score, _, support = reference(name, x, w, T)
        if exact or clear(score):
            compared += 1
            assert r.actions.tolist() == score.argmax(-1).tolist()
        credit = reference_credit(name, x, w, support, r.actions)
        np.testing.assert_allclose(r.credit, credit, atol=1e-5)
        np.testing.assert_allclose(r.credit.sum(axis=0), 1.0, atol=1e-5)
        assert r.agree.tolist() == (x.argmax(-1) == r.actions[None, :]).tolist()
    assert compared >= 30


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_ties_go_to_the_lowest_index(name):
    x = np.zeros((3, 2, 5), dtype=np.float32)
    x[:, 1, 2] = x[:, 1, 4] = 1.0
    (r,) = create(name)([x], [True])
    assert r.actions.tolist() == [0, 2]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_single_model(name):
    x = np.array([[[0.5, 2.0, -1.0]]], dtype=np.float32)
    (r,) = create(name)([x], [True])
    assert r.actions.tolist() == [1]
    assert r.credit.tolist() == [[1.0]]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_sampling_frequencies_match_the_policy(name):
    rng = np.random.default_rng(11)
    x = rng.normal(0, 1.0, (4, 1, 3)).astype(np.float32)
    w = np.ones(4)
    _, policy, _ = reference(name, x, w, T)
    n = 12000
    results = create(name, 5, T)([x] * n, [False] * n)
    counts = np.bincount([int(r.actions[0]) for r in results], minlength=3)
    expected = policy[0] * n
    keep = expected > 5
    chi2 = float((((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum())
    assert chi2 < 16.3, (name, counts, expected)  # 0.001 quantile, 3 degrees of freedom
    assert counts[~keep].sum() <= 10


def test_multiplication_at_temperature_m_is_the_mean_of_logits():
    rng = np.random.default_rng(12)
    x = rng.normal(0, 2, (4, 1, 6)).astype(np.float32)
    (r,) = create("boltzmann_multiplication", 0, 4.0)([x], [True])
    assert r.actions.tolist() == x.mean(axis=0).argmax(-1).tolist()


def test_boltzmann_addition_at_t1_is_sum_probs():
    rng = np.random.default_rng(13)
    xs = [rng.normal(size=(3, 2, 4)).astype(np.float32) for _ in range(100)]
    a = create("sum_probs", 9)(xs, [False] * 100)
    b = create("boltzmann_addition", 9, 1.0)(xs, [False] * 100)
    assert [r.actions.tolist() for r in a] == [r.actions.tolist() for r in b]


def test_vote_credit_goes_to_the_voters():
    x = np.array([[[3.0, 0.0]], [[2.0, 0.0]], [[0.0, 5.0]]], dtype=np.float32)
    (r,) = create("majority_vote")([x], [True])
    assert r.actions.tolist() == [0]
    assert r.credit[:, 0].tolist() == [0.5, 0.5, 0.0]
