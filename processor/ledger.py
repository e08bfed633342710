"""The contribution ledger: credits per model, summed until the evolution component asks.

`take()` is the seed's GET: it returns the sums and starts again from empty.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class Ledger:
    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.steps = 0

    def add(self, models: Iterable[str], credit: np.ndarray) -> None:
        """Add one window's credits; `credit` has one row per model (summed over its batch)."""
        totals = self.totals
        per_model = credit.sum(axis=-1, dtype=np.float64) if credit.ndim > 1 else credit
        for m, c in zip(models, per_model.tolist()):
            totals[m] = totals.get(m, 0.0) + c
        self.steps += credit.shape[-1] if credit.ndim > 1 else 1

    def peek(self) -> dict[str, float]:
        return dict(self.totals)

    def take(self) -> dict[str, float]:
        """The sums so far, and an empty ledger after."""
        out, self.totals, self.steps = self.totals, {}, 0
        return out
