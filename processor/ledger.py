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
    """The sums of one period, for at most `max_models` models at a time.

    Memory stays bounded whatever ids peers invent: past `max_models` models in a period,
    the model credited least recently gives up its slot, and what it had gathered moves
    to the period's OVERFLOW (so CONTRIBUTION plus OVERFLOW still sum to STEPS). Models
    that take part in every window are never the least recent, so only ids seen once or
    rarely are folded. MISSED, likewise, names at most `max_models` models.
    """

    def __init__(self, max_models: int = 1024) -> None:
        self.max_models = max_models
        self.epoch = 0
        self._answered: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # Models get a slot on first sight; the sums are arrays over slots, so a burst of
        # windows is booked with a few bincounts instead of a loop per model. Slot 0 holds
        # the overflow; `_used[i]` is the burst that last credited slot i (the least recent
        # gives up its slot).
        self._index: dict[str, int] = {}
        self._size = 1                     # slots in use, overflow included
        self._slot_name: dict[int, str] = {}
        self._credit = np.zeros(64)
        self._taken = np.zeros(64, dtype=np.int64)   # environment steps taken part in
        self._agreed = np.zeros(64, dtype=np.int64)
        self._used = np.zeros(64, dtype=np.int64)
        self._burst = 0
        self.steps = 0                     # environment steps decided in this period
        self.missed: dict[str, int] = {}
        self.folded = 0                    # times a model's sums went to the overflow

    @property
    def names(self) -> list[str]:
        """The models that hold a slot now."""
        return list(self._index)

    def _ids(self, windows: Iterable[Iterable[str]]) -> np.ndarray:
        """The slots of the models of these windows, in order (new models get one)."""
        index = self._index
        names = [m for models in windows for m in models]
        ids = np.array([index.get(m, -1) for m in names], dtype=np.intp)
        self._burst += 1
        self._used[ids[ids > 0]] = self._burst  # kept through this burst
        for k in np.flatnonzero(ids < 0).tolist():  # models without a slot (rare)
            m = names[k]
            i = index.get(m)  # (given one earlier in this burst)
            if i is None:
                i = self._slot()
                if i:
                    index[m] = i
                    self._slot_name[i] = m
                    self._used[i] = self._burst
            ids[k] = i
        return ids

    def _slot(self) -> int:
        """A slot for a new model: a new one, or the least recent model's; 0 = overflow."""
        if len(self._index) < self.max_models:
            i = self._size
            self._size += 1
            if i >= len(self._credit):
                grow = 2 * len(self._credit)
                for name in ("_credit", "_taken", "_agreed", "_used"):
                    a = np.resize(getattr(self, name), grow)
                    a[i:] = 0
                    setattr(self, name, a)
            return i
        i = 1 + int(self._used[1:self._size].argmin())
        self.folded += 1
        if self._used[i] == self._burst:
            return 0  # more distinct models in one burst than slots
        del self._index[self._slot_name.pop(i)]
        for a in (self._credit, self._taken, self._agreed):
            a[0] += a[i]
            a[i] = 0
        return i

    def add_many(self, windows: Sequence[Sequence[str]], credit: np.ndarray,
                 agree: np.ndarray | None = None) -> list[tuple[str, float, int, int]]:
        """Windows of one shape: their models, credit (W, M, B), agree (W, M, B).

        Returns, for the metrics, each model's credit, steps taken part in and agreements
        from these windows.
        """
        w, _, b = credit.shape
        ids = self._ids(windows)
        n = self._size
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
        slot_name = self._slot_name
        per_l, taken_l, agreed_l = per.tolist(), taken.tolist(), agreed.tolist()
        out = [(slot_name[i], per_l[i], taken_l[i], agreed_l[i])
               for i in np.flatnonzero(taken).tolist() if i]
        if taken[0]:
            # The overflow slot holds several models: their own sums, one by one (rare).
            c = credit.sum(axis=-1, dtype=np.float64).ravel()
            g = agree.sum(axis=-1).ravel() if agree is not None else np.zeros(len(ids))
            names = [x for models in windows for x in models]
            sums: dict[str, list[float]] = {}
            for k in np.flatnonzero(ids == 0).tolist():
                e = sums.setdefault(names[k], [0.0, 0, 0])
                e[0] += float(c[k])
                e[1] += b
                e[2] += int(g[k])
            out += [(name, v[0], int(v[1]), int(v[2])) for name, v in sums.items()]
        return out

    def add(self, models: Sequence[str], credit: np.ndarray,
            agree: np.ndarray | None = None) -> None:
        """One window: credit (M,) or (M, B); agree, the same shape, as booleans."""
        c = credit.reshape(len(models), -1)[None]
        a = None if agree is None else agree.reshape(len(models), -1)[None]
        self.add_many([models], c, a)

    def miss(self, models: Iterable[str]) -> None:
        """Count one missed window for each of these models (at most max_models named)."""
        missed = self.missed
        for m in models:
            n = missed.get(m)
            if n is not None:
                missed[m] = n + 1
            elif len(missed) < self.max_models:
                missed[m] = 1

    def peek(self) -> dict[str, float]:
        return {name: float(self._credit[i]) for name, i in self._index.items()
                if self._taken[i]}

    def report(self, strategy: str = "") -> dict[str, Any]:
        """The period so far, as the evolution reply carries it."""
        present = [(name, i) for name, i in self._index.items() if self._taken[i]]
        out: dict[str, Any] = {
            "CONTRIBUTION": {name: float(self._credit[i]) for name, i in present},
            "AGREEMENT": {name: float(self._agreed[i] / self._taken[i]) for name, i in present},
            "MISSED": dict(self.missed),
            "STEPS": self.steps,
            "EPOCH": self.epoch,
        }
        if self._taken[0]:
            # Models that gave up their slot (more than max_models in the period).
            out["OVERFLOW"] = {"CONTRIBUTION": float(self._credit[0]),
                               "STEPS": int(self._taken[0]), "MODELS": self.folded}
        if strategy:
            out["STRATEGY"] = strategy
        return out

    def reset(self) -> None:
        """Start the next period without reporting."""
        self._credit[:] = 0
        self._taken[:] = 0
        self._agreed[:] = 0
        self._index.clear()   # every period starts empty: ids of the past hold no memory
        self._slot_name.clear()
        self._used[:] = 0
        self._size = 1
        self.steps = 0
        self.missed = {}
        self.folded = 0
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


def merge_replies(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """One evolution reply from the shares of several workers (NATS: one per partition
    owner), as each worker's ledger reported them.

    CONTRIBUTION, MISSED and STEPS add up exactly; AGREEMENT is averaged, weighted by each
    worker's STEPS.
    """
    contribution: dict[str, float] = {}
    missed: dict[str, int] = {}
    agree: dict[str, float] = {}
    weight: dict[str, float] = {}
    steps = 0
    workers, parts = [], set()
    for r in replies:
        s = int(r.get("STEPS", 0))
        steps += s
        for m, c in r.get("CONTRIBUTION", {}).items():
            contribution[m] = contribution.get(m, 0.0) + c
        for m, c in r.get("MISSED", {}).items():
            missed[m] = missed.get(m, 0) + c
        for m, a in r.get("AGREEMENT", {}).items():
            agree[m] = agree.get(m, 0.0) + a * s
            weight[m] = weight.get(m, 0.0) + s
        workers.append(r.get("WORKER"))
        parts.update(r.get("PARTITIONS", ()))
    return {"CONTRIBUTION": contribution, "STEPS": steps, "MISSED": missed,
            "AGREEMENT": {m: agree[m] / weight[m] for m in agree if weight[m]},
            "WORKERS": workers, "PARTITIONS": sorted(parts)}
