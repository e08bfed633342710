"""The evolution loop: rank the models by their contribution and act on the ranking.

A round asks the worker for the contributions since the previous round (`CMD: GET`,
which starts a new period), ranks the models (highest first; ties by name), and acts:

- `copy`: the best model's policy weights go to the worst model, with a little Gaussian
  noise (a mutation), over the bus: `CMD: COPY` on `weights` asks the best model to send
  them, the worst loads them and says LOADED on `control`. The round ends when it has.
- `weights`: the worker's aggregation weights follow the ranking (`SET_MODEL_WEIGHTS`):
  2.0 for the best model down to 0.5 for the worst, so better models count more in the
  swarm's action.
- `both`: the two.

The environment runs a round between two steps (as the RLGym example's control notebook
alternates episodes and evolution steps): nothing is in flight then, so a round's report
covers exactly the steps since the previous one, and a copied model answers the next
observation with its new weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .common import WEIGHTS

BEST_WEIGHT, WORST_WEIGHT = 2.0, 0.5


@dataclass
class Round:
    number: int
    step: int
    ranking: list[str]
    contribution: dict[str, float]
    basis: str = ""                             # the steps ranked on, in words
    copied: tuple[str, str] | None = None       # (from, to)
    weights: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def rank(contribution: dict[str, float], models: list[str]) -> list[str]:
    """Models by contribution, highest first; a model absent from the report has 0."""
    return sorted(models, key=lambda m: (-contribution.get(m, 0.0), m))


def rank_weights(ranking: list[str]) -> dict[str, float]:
    """Aggregation weights from BEST_WEIGHT (first) to WORST_WEIGHT (last), linear in rank."""
    n = len(ranking)
    if n == 1:
        return {ranking[0]: 1.0}
    step = (BEST_WEIGHT - WORST_WEIGHT) / (n - 1)
    return {m: round(BEST_WEIGHT - i * step, 6) for i, m in enumerate(ranking)}


class Evolution:
    """Rounds on one swarm connection (the environment's). `control` is the subscription
    to the `control` topic, where LOADED comes back."""

    def __init__(self, swarm: Any, control: Any, models: list[str], mode: str,
                 noise: float, eval_steps: int = 0, timeout: float = 30.0) -> None:
        self.swarm = swarm
        self.evolution = swarm.evolution()
        self.control = control
        self.models = models
        self.mode = mode
        self.noise = noise
        self.eval_steps = eval_steps
        self.timeout = timeout
        self.total: dict[str, float] = {m: 0.0 for m in models}  # over the whole run
        self.ranked: dict[str, float] = {m: 0.0 for m in models}  # over what rounds ranked
        self.steps = 0               # environment steps the reports counted (STEPS)
        self.rounds: list[Round] = []
        self.best: dict[str, int] = {m: 0 for m in models}
        self.worst: dict[str, int] = {m: 0 for m in models}

    def take(self) -> dict[str, float]:
        """GET: the contributions since the previous GET, added to the run's totals."""
        report = self.evolution.get(timeout=self.timeout)
        contribution = {str(k): float(v) for k, v in report.get("CONTRIBUTION", {}).items()}
        for m, c in contribution.items():
            self.total[m] = self.total.get(m, 0.0) + c
        self.steps += int(report.get("STEPS", 0))
        return contribution

    def round(self, step: int) -> Round:
        t0 = time.monotonic()
        contribution = self.take()
        ranking = rank(contribution, self.models)
        for m, c in contribution.items():
            self.ranked[m] = self.ranked.get(m, 0.0) + c
        basis = (f"ranked on {self.eval_steps} argmax steps" if self.eval_steps
                 else "ranked on the steps since the last round")
        r = Round(len(self.rounds) + 1, step, ranking, contribution, basis)
        self.best[ranking[0]] += 1
        self.worst[ranking[-1]] += 1
        if self.mode in ("copy", "both") and len(ranking) > 1:
            self._copy(r, ranking[0], ranking[-1])
        if self.mode in ("weights", "both"):
            reply = self.evolution.set_model_weights(rank_weights(ranking), timeout=self.timeout)
            r.weights = {str(k): float(v) for k, v in reply.get("MODEL_WEIGHTS", {}).items()}
        r.seconds = time.monotonic() - t0
        self.rounds.append(r)
        return r

    def _copy(self, r: Round, best: str, worst: str) -> None:
        self.swarm.publish(WEIGHTS, {"CMD": "COPY", "SOURCE": best, "TARGET": worst,
                                     "ROUND": r.number, "NOISE": self.noise})
        end = time.monotonic() + self.timeout
        while True:
            msg = self.control.get(timeout=max(0.0, end - time.monotonic()))
            if isinstance(msg, dict) and msg.get("LOADED") == r.number \
                    and msg.get("MODEL") == worst:
                r.copied = (best, worst)
                return
            # anything else on `control` now (a late HELLO) is of no use any more
