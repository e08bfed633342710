"""The strategy study: it runs, its figures are consistent, the plot is written."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from processor.aggregate import STRATEGIES
from processor.apps.study import mixed_swarm, run_study, spearman

pytestmark = pytest.mark.timeout(120)


def test_study_reports_every_rule_and_writes_the_plot(tmp_path):
    png, js = tmp_path / "study.png", tmp_path / "study.json"
    out = io.StringIO()
    runs = run_study(steps=400, good=3, noisy=2, adversarial=2, period=50, png=str(png),
                     json_path=str(js), out=out)
    assert {(r.strategy, r.deterministic) for r in runs} == \
        {(s, d) for s in STRATEGIES for d in (True, False)}
    for r in runs:
        assert 0.0 <= r.reward <= 1.0
        assert sum(r.contribution.values()) == pytest.approx(400, rel=1e-4)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(js.read_text())
    assert len(data["runs"]) == 2 * len(STRATEGIES)
    assert "rank corr." in out.getvalue()
    by = {(r.strategy, r.deterministic): r for r in runs}
    # Majority vote ignores confidence: adversaries cannot outvote the good models.
    vote = by[("majority_vote", True)]
    assert vote.rank_correlation > 0.8
    assert vote.reward > by[("boltzmann_multiplication", True)].reward
    good = [vote.contribution[n] for n, k in zip(data["swarm"]["names"], data["swarm"]["kinds"])
            if k == "good"]
    adv = [vote.contribution[n] for n, k in zip(data["swarm"]["names"], data["swarm"]["kinds"])
           if k == "adversarial"]
    assert min(good) > max(adv)


def test_swarm_and_spearman():
    s = mixed_swarm(2, 1, 1, 0)
    assert s.kinds == ["good", "good", "noisy", "adversarial"]
    assert spearman(np.array([1, 2, 3]), np.array([10, 20, 30])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3]), np.array([3, 2, 1])) == pytest.approx(-1.0)
