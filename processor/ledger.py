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
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

REMEMBERED_REQUESTS = 64


class Ledger:
    def __init__(self) -> None:
        self.epoch = 0
        self._answered: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # Models get an index on first sight; the sums are arrays over those indices, so a
        # burst of windows is booked with a few bincounts instead of a loop per model.
        self._index: dict[str, int] = {}
        self.names: list[str] = []
        self._credit = np.zeros(64)
        self._taken = np.zeros(64, dtype=np.int64)   # environment steps taken part in
        self._agreed = np.zeros(64, dtype=np.int64)
        self.steps = 0                     # environment steps decided in this period
        self.missed: dict[str, int] = {}

    def _ids(self, windows: Iterable[Iterable[str]]) -> np.ndarray:
        index = self._index
        out = []
        for models in windows:
            for m in models:
                i = index.get(m)
                if i is None:
                    i = index[m] = len(self.names)
                    self.names.append(m)
                out.append(i)
        n = len(self.names)
        if n > len(self._credit):
            grow = max(n, 2 * len(self._credit))
            self._credit = np.resize(self._credit, grow)
            self._taken = np.resize(self._taken, grow)
            self._agreed = np.resize(self._agreed, grow)
            self._credit[n:] = 0
            self._taken[n:] = 0
            self._agreed[n:] = 0
        return np.array(out, dtype=np.intp)

    def add_many(self, windows: Sequence[Sequence[str]], credit: np.ndarray,
                 agree: np.ndarray | None = None) -> list[tuple[str, float, int, int]]:
        """Windows of one shape: their models, credit (W, M, B), agree (W, M, B).

        Returns, for the metrics, each model's credit, steps taken part in and agreements
        from these windows.
        """
        w, _, b = credit.shape
        ids = self._ids(windows)
        n = len(self.names)
        per = np.bincount(ids, weights=credit.sum(axis=-1, dtype=np.float64).ravel(),
                          minlength=n)
        self._credit[:n] += per
        taken = np.bincount(ids, minlength=n) * b
        self._taken[:n] += taken
        agreed = np.zeros(n, dtype=np.int64)
        if agree is not None:
            agreed = np.bincount(ids, weights=agree.sum(axis=-1).ravel(),
                                 minlength=n).astype(np.int64)
            self._agreed[:n] += agreed
        self.steps += w * b
        names = self.names
        return [(names[i], float(per[i]), int(taken[i]), int(agreed[i]))
                for i in np.flatnonzero(taken).tolist()]

    def add(self, models: Sequence[str], credit: np.ndarray,
            agree: np.ndarray | None = None) -> None:
        """One window: credit (M,) or (M, B); agree, the same shape, as booleans."""
        c = credit.reshape(len(models), -1)[None]
        a = None if agree is None else agree.reshape(len(models), -1)[None]
        self.add_many([models], c, a)

    def miss(self, models: Iterable[str]) -> None:
        """Count one missed window for each of these models."""
        missed = self.missed
        for m in models:
            missed[m] = missed.get(m, 0) + 1

    def _present(self) -> list[int]:
        return np.flatnonzero(self._taken[:len(self.names)]).tolist()

    def peek(self) -> dict[str, float]:
        return {self.names[i]: float(self._credit[i]) for i in self._present()}

    def report(self, strategy: str = "") -> dict[str, Any]:
        """The period so far, as the evolution reply carries it."""
        present = self._present()
        names = self.names
        out: dict[str, Any] = {
            "CONTRIBUTION": {names[i]: float(self._credit[i]) for i in present},
            "AGREEMENT": {names[i]: float(self._agreed[i] / self._taken[i]) for i in present},
            "MISSED": dict(self.missed),
            "STEPS": self.steps,
            "EPOCH": self.epoch,
        }
        if strategy:
            out["STRATEGY"] = strategy
        return out

    def reset(self) -> None:
        """Start the next period without reporting."""
        self._credit[:] = 0
        self._taken[:] = 0
        self._agreed[:] = 0
        self.steps = 0
        self.missed = {}
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
