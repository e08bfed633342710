"""The contribution ledger: what each model did for the actions taken, per period.

A period (an EPOCH) runs from one reset to the next. For each model it sums the credit of
the actions taken (the seed's contribution), counts the environment steps it took part
in and how often its own argmax was the action taken (agreement), and counts the windows
it missed (closed without it). `take()` is the seed's GET: report, then start the next
period. A GET with a request id is idempotent: asking again with the same id (because the
reply was lost) returns the same report instead of an empty one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np

REMEMBERED_REQUESTS = 64


class Ledger:
    def __init__(self) -> None:
        self.epoch = 0
        self._answered: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._clear()

    def _clear(self) -> None:
        self.totals: dict[str, float] = {}
        self.steps = 0                     # environment steps decided in this period
        self.taken: dict[str, int] = {}    # environment steps each model took part in
        self.agreed: dict[str, int] = {}
        self.missed: dict[str, int] = {}

    def add(self, models: Iterable[str], credit: np.ndarray,
            agree: np.ndarray | None = None) -> None:
        """One window: credit (M,) or (M, B); agree, the same shape, as booleans."""
        batch = credit.shape[1] if credit.ndim > 1 else 1
        per_model = credit.sum(axis=-1, dtype=np.float64) if credit.ndim > 1 else credit
        agreed = (agree.reshape(len(per_model), -1).sum(axis=-1).tolist()
                  if agree is not None else None)
        totals, taken, agreed_d = self.totals, self.taken, self.agreed
        for i, (m, c) in enumerate(zip(models, per_model.tolist())):
            totals[m] = totals.get(m, 0.0) + c
            taken[m] = taken.get(m, 0) + batch
            if agreed is not None:
                agreed_d[m] = agreed_d.get(m, 0) + agreed[i]
        self.steps += batch

    def miss(self, models: Iterable[str]) -> None:
        """Count one missed window for each of these models."""
        missed = self.missed
        for m in models:
            missed[m] = missed.get(m, 0) + 1

    def report(self, strategy: str = "") -> dict[str, Any]:
        """The period so far, as the evolution reply carries it."""
        out: dict[str, Any] = {
            "CONTRIBUTION": dict(self.totals),
            "AGREEMENT": {m: self.agreed.get(m, 0) / n for m, n in self.taken.items() if n},
            "MISSED": dict(self.missed),
            "STEPS": self.steps,
            "EPOCH": self.epoch,
        }
        if strategy:
            out["STRATEGY"] = strategy
        return out

    def peek(self) -> dict[str, float]:
        return dict(self.totals)

    def reset(self) -> None:
        """Start the next period without reporting."""
        self._clear()
        self.epoch += 1

    def take(self, request_id: str | None = None, strategy: str = "") -> dict[str, Any]:
        """The seed's GET: the report of this period, then the next period begins.

        With a request id seen before, the report given then, and no reset.
        """
        if request_id is not None:
            done = self._answered.get(request_id)
            if done is not None:
                return done
        out = self.report(strategy)
        self.reset()
        if request_id is not None:
            out["REQUEST_ID"] = request_id
            self._answered[request_id] = out
            while len(self._answered) > REMEMBERED_REQUESTS:
                self._answered.popitem(last=False)
        return out
