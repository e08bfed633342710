"""sum_probs against the seed's own outputs and an independent reference."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from processor.aggregate import SumProbs
from processor.ledger import Ledger
from tests.reference import clear_winner, sum_probs

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testdata" / \
    "seed_get_action_vectors.json"


def _vectors() -> list[dict]:
    if not VECTORS.exists():  # a clone without shared/ beside it
        if os.environ.get("CI"):
            pytest.fail(f"{VECTORS} not found: CI must run with shared/ beside the clone")
        pytest.skip(f"{VECTORS} not found")
    return json.loads(VECTORS.read_text())["cases"]


def test_reproduces_every_seed_vector_one_by_one():
    cases = _vectors()
    assert len(cases) == 240
    agg = SumProbs()
    for case in cases:
        ids = list(case["logits"])
        stack = np.asarray([case["logits"][k] for k in ids], dtype=np.float32)[:, None, :]
        (res,) = agg([stack], [True])
        assert int(res.actions[0]) == case["action"]
        for i, k in enumerate(ids):
            assert abs(float(res.credit[i, 0]) - case["contribution"][k]) <= 1e-6


def test_reproduces_every_seed_vector_batched_in_one_call():
    cases = _vectors()
    stacks = [np.asarray(list(c["logits"].values()), dtype=np.float32)[:, None, :]
              for c in cases]
    results = SumProbs()(stacks, [True] * len(stacks))
    for case, res in zip(cases, results):
        assert int(res.actions[0]) == case["action"]
        want = np.array(list(case["contribution"].values()))
        np.testing.assert_allclose(res.credit[:, 0], want, atol=1e-6)


@pytest.mark.parametrize("models,batch,actions", [(1, 1, 2), (1, 3, 5), (3, 1, 18),
                                                  (20, 1, 18), (20, 4, 6), (5, 2, 1000)])
def test_matches_independent_reference_on_random_inputs(models, batch, actions):
    rng = np.random.default_rng(models * 1000 + actions)
    stacks = [(rng.normal(0, rng.choice([0.5, 3.0, 30.0]), (models, batch, actions)))
              .astype(np.float32) for _ in range(200)]
    results = SumProbs()(stacks, [True] * len(stacks))
    compared = 0
    for x, res in zip(stacks, results):
        total, action, _ = sum_probs(x)
        _, _, credit = sum_probs(x, res.actions)  # credit where the worker chose
        np.testing.assert_allclose(res.credit, credit, atol=1e-6)
        np.testing.assert_allclose(res.credit.sum(axis=0), 1.0, atol=1e-5)
        if clear_winner(total):
            compared += 1
            assert res.actions.tolist() == action.tolist()
    assert compared >= 100  # near-ties (two one-hot models) are skipped, the rest compared


def test_m_equals_one_gives_the_models_argmax_and_full_credit():
    x = np.array([[[0.1, 2.0, -1.0]]], dtype=np.float32)
    (res,) = SumProbs()([x], [True])
    assert res.actions.tolist() == [1]
    assert res.credit.tolist() == [[1.0]]


def test_ties_go_to_the_lowest_action_index():
    x = np.array([[[1.0, 3.0, 3.0, 0.0]], [[0.0, 5.0, 5.0, 5.0]]], dtype=np.float32)
    (res,) = SumProbs()([x], [True])
    assert res.actions.tolist() == [1]
    identical = np.zeros((4, 2, 7), dtype=np.float32)
    (res,) = SumProbs()([identical], [True])
    assert res.actions.tolist() == [0, 0]
    np.testing.assert_allclose(res.credit, 0.25)


def test_huge_finite_logits_do_not_overflow():
    x = np.array([[[3e38, -3e38, 0.0]], [[-3e38, 3e38, 1e38]]], dtype=np.float32)
    (res,) = SumProbs()([x], [True])
    assert np.isfinite(res.credit).all()
    assert res.actions.tolist() == [0]
    np.testing.assert_allclose(res.credit.sum(axis=0), 1.0)


def test_mixed_shapes_and_modes_in_one_call_keep_their_order():
    rng = np.random.default_rng(7)
    stacks = [rng.normal(size=s).astype(np.float32)
              for s in [(3, 1, 4), (5, 2, 6), (3, 1, 4), (1, 1, 9)]]
    dets = [True, False, True, True]
    results = SumProbs(seed=1)(stacks, dets)
    for x, d, res in zip(stacks, dets, results):
        assert res.actions.shape == (x.shape[1],)
        assert res.credit.shape == x.shape[:2]
        if d:
            assert res.actions.tolist() == sum_probs(x)[1].tolist()


def test_sampling_is_reproducible_with_a_seed():
    rng = np.random.default_rng(0)
    stacks = [rng.normal(size=(4, 2, 5)).astype(np.float32) for _ in range(50)]
    a = [r.actions.tolist() for r in SumProbs(seed=42)(stacks, [False] * 50)]
    b = [r.actions.tolist() for r in SumProbs(seed=42)(stacks, [False] * 50)]
    c = [r.actions.tolist() for r in SumProbs(seed=43)(stacks, [False] * 50)]
    assert a == b
    assert a != c


def test_sampling_frequencies_match_p():
    x = np.log(np.array([[[0.1, 0.2, 0.7]], [[0.5, 0.4, 0.1]]], dtype=np.float32))
    n = 20000
    results = SumProbs(seed=3)([x] * n, [False] * n)
    counts = np.bincount([int(r.actions[0]) for r in results], minlength=3)
    expected = np.array([0.3, 0.3, 0.4]) * n  # (p1 + p2) / 2
    # Chi-square with 2 degrees of freedom: 13.8 is the 0.001 quantile.
    chi2 = float((((counts - expected) ** 2) / expected).sum())
    assert chi2 < 13.8, (counts, expected)
    # Credit follows the sampled action: p_m[a] / P[a].
    for r in results[:50]:
        a = int(r.actions[0])
        p = np.exp(x[:, 0, :])
        np.testing.assert_allclose(r.credit[:, 0], p[:, a] / p[:, a].sum(), atol=1e-6)


def test_ledger_get_and_reset():
    led = Ledger()
    led.add(["a", "b"], np.array([0.25, 0.75], dtype=np.float32))
    led.add(["b", "c"], np.array([[0.5, 0.1], [0.5, 0.9]], dtype=np.float32))
    assert led.peek() == pytest.approx({"a": 0.25, "b": 1.35, "c": 1.4})
    assert led.steps == 3
    report = led.take()
    assert report["CONTRIBUTION"] == pytest.approx({"a": 0.25, "b": 1.35, "c": 1.4})
    assert report["STEPS"] == 3 and report["EPOCH"] == 0
    assert led.take()["CONTRIBUTION"] == {}
