"""Aggregation: many windows' logits in, one action per environment and credits out.

Every rule works on a (W, M, B, A) float32 tensor (windows, models, environments, actions)
in one pass of torch, so the cost per window falls as bursts grow. Each rule defines

    support[m, a]  what model m gives to action a (>= 0)
    score[a]       the rule's preference: argmax in deterministic mode (ties: lowest index)
    policy         the distribution sampled from otherwise (the worker's seeded generator)
    credit[m]      support[m, a] / sum_k support[k, a] for the action a taken: it sums to 1
                   over the models of one environment step

Sums over the models run in float32, in model order, one column at a time: equal inputs
give equal scores whatever the action's position, A, M or the burst, so an exact tie in the
input is a tie in the score and goes to the lowest action index. (torch's float32 reduction
adds a column in an order that depends on its SIMD lane, so an exact tie went to the higher
index about one time in seven; the seed's own sums do the same. This is the one place where
the worker is deliberately not the seed's bit for bit.)

Optional per-model weights w_m (default 1) scale each model's support. The rules:

- `sum_probs` (the seed, swergio RLGym example `get_action`; Boltzmann addition at T = 1):
  support = w_m p_m with p_m = softmax(logits_m) in float32; score = sum_m support;
  policy = score / sum(score); credit = w_m p_m[a] / sum_k w_k p_k[a], the seed's
  p_m[a] / P[a] when unweighted.
- `boltzmann_addition` (Wiering & van Hasselt, "Ensemble Algorithms in Reinforcement
  Learning", IEEE TSMC-B 38(4), 2008): the same preference P(a) = sum_m w_m p_m(a), policy
  proportional to P(a)^(1/T) (`aggregate.temperature`); credit as sum_probs.
- `boltzmann_multiplication` (ibid.): policy proportional to prod_m p_m(a)^(w_m / T), computed
  in log space as softmax(sum_m w_m logits_m / T) (the log-sum-exp of each model is constant
  over a and cancels), so T = M is the mean of the logits, a product of experts. Support is
  each model's probability w_m p_m(a), so credit means the same as under the additive rules.
- `majority_vote` (ibid.): each model votes w_m for its own argmax; V(a) = the votes for a;
  policy proportional to exp(V(a) / T). Credit goes to the models that voted for a, in
  proportion to their weight; when nobody voted for a sampled action, to p_m(a) as in
  sum_probs.
- `rank_vote` (ibid.): each model gives its best action A points, the next A - 1, down to 1
  for its worst (ties in a model's logits broken by action index); R(a) = sum_m w_m r_m(a);
  policy proportional to exp(R(a) / T); credit = w_m r_m(a) / R(a).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def use_one_thread() -> None:
    """For a process that runs a worker: torch's small tensors here gain nothing from
    threads, which would steal a core from the transport. Called where a worker starts, not
    at import, so importing the package changes no program's torch settings."""
    torch.set_num_threads(1)


@dataclass(slots=True)
class Result:
    actions: np.ndarray  # int64, shape (B,)
    credit: np.ndarray   # float64, shape (M, B): model m's share of environment b's action
    agree: np.ndarray    # bool, shape (M, B): model m's own argmax was the action taken


class Strategy:
    """Shared frame of the rules: grouping by shape, argmax or sampling, credit."""

    name = ""

    def __init__(self, seed: int = 0, temperature: float = 1.0) -> None:
        self.rng = np.random.default_rng(seed)
        self.temperature = temperature

    def __call__(self, stacks: Sequence[np.ndarray], deterministic: Sequence[bool],
                 weights: Sequence[np.ndarray | None] | None = None) -> list[Result]:
        """Aggregate windows; `stacks[i]` is window i's float32 logits of shape (M, B, A).

        `weights[i]`, when given and not None, holds window i's per-model weights (M,).
        A convenience over `aggregate`, which takes windows of one shape already stacked.
        """
        results: list[Result | None] = [None] * len(stacks)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(stacks):
            groups.setdefault(s.shape, []).append(i)
        for idx in groups.values():
            x = np.stack([stacks[i] for i in idx])                       # (W, M, B, A)
            det = np.array([deterministic[i] for i in idx], dtype=bool)
            w = None
            if weights is not None and any(weights[i] is not None for i in idx):
                ones = np.ones(x.shape[1], np.float32)
                rows: list[np.ndarray] = []
                for i in idx:
                    wi = weights[i]
                    rows.append(ones if wi is None else wi)
                w = np.stack(rows).astype(np.float32)                     # (W, M)
            actions, credit, agree = self.aggregate(x, det, w)
            for j, i in enumerate(idx):
                results[i] = Result(actions[j], credit[j], agree[j])
        return results  # type: ignore[return-value]

    def aggregate(self, x: np.ndarray, det: np.ndarray, w: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Windows of one shape: x (W, M, B, A) float32, det (W,) bool, w (W, M) or None.

        Returns actions (W, B) int64, credit (W, M, B) float64, agree (W, M, B) bool.
        """
        actions, credit = self.decide(x, det, w)
        return actions, credit, agreement(x, actions)

    def decide(self, x: np.ndarray, det: np.ndarray, w: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """`aggregate` without the agreement (which the worker works out once the actions
        are out): actions (W, B) int64 and credit (W, M, B) float64.

        torch computes the softmax, as the seed does, so the probabilities are the seed's
        to the bit; what follows (sums over the models, argmax, draws, gathers, divisions)
        runs in numpy, where a small array costs a microsecond per operation instead of
        several, and where each column's sum is added in model order (see the module's
        docstring on ties).
        """
        xt = torch.from_numpy(x)
        probs_t = torch.softmax(xt, dim=-1)                              # (W, M, B, A)
        support_t, summed_t = self.support(xt, probs_t, None if w is None
                                           else torch.from_numpy(w))
        probs = probs_t.numpy()
        support = probs if support_t is probs_t else support_t.numpy()
        score = _sum_models(support if summed_t is support_t else summed_t.numpy())  # W, B, A
        n_w, _, n_b, _ = x.shape
        if n_w == 1 and n_b == 1 and self.score_sums_support and not self.support_may_vanish:
            return self._one(x, bool(det[0]), score, support)
        actions = score.argmax(axis=-1)                                  # (W, B)
        if not det.all():
            if not det.any():
                actions = self.sample(score, support)
            else:
                rows = ~det
                actions[rows] = self.sample(score[rows], support[rows])
        wi, bi = np.arange(n_w)[:, None], np.arange(n_b)[None, :]
        chosen = support[wi, :, bi, actions].transpose(0, 2, 1).astype(np.float64)  # W, M, B
        if self.score_sums_support:
            total = score[wi, bi, actions][:, None, :].astype(np.float64)  # (W, 1, B)
        else:
            total = chosen.sum(axis=1, keepdims=True)
        if self.support_may_vanish and (total <= 0).any():
            # Nobody supported the action taken (a sampled action no model voted for):
            # each model's probability of it stands in.
            weighted = probs if w is None else probs * w[:, :, None, None]
            fallback = weighted[wi, :, bi, actions].transpose(0, 2, 1).astype(np.float64)
            chosen = np.where(total > 0, chosen, fallback)
            total = chosen.sum(axis=1, keepdims=True)
        return actions, chosen / total

    def _one(self, x: np.ndarray, det: bool, score: np.ndarray, support: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
        """`aggregate` of one window of one environment (lockstep), for the rules whose
        score sums the support: plain indexing and a scalar total instead of gathers; the
        same values, operation for operation."""
        a = int(score[0, 0].argmax()) if det else int(self.sample(score, support)[0, 0])
        credit = support[0, :, 0, a].astype(np.float64) / float(score[0, 0, a])   # (M,)
        return np.array([[a]]), credit.reshape(1, credit.shape[0], 1)

    # score is the sum of support over the models (the credit's denominator is score[a])
    score_sums_support = True
    # the action taken may have no support (votes), or support that underflows to 0
    support_may_vanish = False

    def support(self, x: torch.Tensor, probs: torch.Tensor, w: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(support, summed), both (W, M, B, A): score = summed over the models."""
        raise NotImplementedError

    def sample(self, score: np.ndarray, support: np.ndarray) -> np.ndarray:
        """Draw one action per environment from score (w, B, A): softmax(score / T)."""
        z = score / self.temperature
        return self._draw(np.exp(z - z.max(axis=-1, keepdims=True)))

    def _draw(self, weights: np.ndarray) -> np.ndarray:
        """One draw per row of unnormalised weights (w, B, A), by the inverse of the CDF.

        A uniform u in [0, total) picks the first action whose cumulative weight exceeds
        it, so an action of weight 0 is never drawn.
        """
        if weights.shape[:-1] == (1, 1):
            # One draw (lockstep): the same uniform, product and count, in scalars.
            row = weights[0, 0].cumsum(dtype=np.float64)
            at = self.rng.random() * row[-1]
            return np.array([[min(int(row.searchsorted(at, "right")), len(row) - 1)]])
        cdf = weights.cumsum(axis=-1, dtype=np.float64)
        u = self.rng.random(cdf.shape[:-1]) * cdf[..., -1]
        drawn: np.ndarray = np.minimum((cdf <= u[..., None]).sum(axis=-1), cdf.shape[-1] - 1)
        return drawn


def agreement(x: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """(W, M, B) bool: whether model m's own argmax (logits x, (W, M, B, A)) is the action
    taken (actions, (W, B)); ties in a model's logits go to the lowest index."""
    agree: np.ndarray = x.argmax(axis=-1) == actions[:, None, :]
    return agree


def _sum_models(v: np.ndarray) -> np.ndarray:
    """(W, M, B, A) -> (W, B, A) of the same dtype, each column added in model order.

    float32, as the seed: its rounding decides the near-ties of the seed's vectors (1 +
    3e-9 is 1). Every column goes through the same elementwise additions, row after row,
    which torch's reductions do not promise (their order follows SIMD lanes). numpy's
    `add.reduce` over an axis that is not the innermost of a C-contiguous array is that
    loop (it adds whole rows; its pairwise summation applies only along the innermost
    axis), in one call instead of M; where B * A = 1 the models' axis would be the
    innermost, so the loop is written out.
    """
    if v.flags.c_contiguous and v.shape[2] * v.shape[3] > 1:
        out: np.ndarray = np.add.reduce(v, axis=1)
        return out
    out = v[:, 0].copy()
    for m in range(1, v.shape[1]):
        out += v[:, m]
    return out


def _weighted(probs: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return probs if w is None else probs * w[:, :, None, None]


class SumProbs(Strategy):
    name = "sum_probs"

    def support(self, x: torch.Tensor, probs: torch.Tensor, w: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        s = _weighted(probs, w)
        return s, s

    def sample(self, score: np.ndarray, support: np.ndarray) -> np.ndarray:
        return self._draw(score)  # Categorical(P / sum P), as the seed


class BoltzmannAddition(SumProbs):
    name = "boltzmann_addition"

    def sample(self, score: np.ndarray, support: np.ndarray) -> np.ndarray:
        if self.temperature == 1.0:
            return self._draw(score)
        with np.errstate(divide="ignore"):  # log 0 = -inf: weight 0, as it should
            z = np.log(score) / self.temperature
        return self._draw(np.exp(z - z.max(axis=-1, keepdims=True)))


class BoltzmannMultiplication(Strategy):
    name = "boltzmann_multiplication"
    score_sums_support = False
    support_may_vanish = True

    def support(self, x: torch.Tensor, probs: torch.Tensor, w: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # float64: the sum of saturated logits (+-3.4e38, a float64 model's mask) times
        # weights must not overflow to infinities, whose difference is NaN.
        xs = x.double() if w is None else x.double() * w.double()[:, :, None, None]
        return _weighted(probs, w), xs


class MajorityVote(Strategy):
    name = "majority_vote"
    support_may_vanish = True

    def support(self, x: torch.Tensor, probs: torch.Tensor, w: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        votes = torch.zeros_like(x).scatter_(-1, x.argmax(dim=-1, keepdim=True), 1.0)
        votes = _weighted(votes, w)
        return votes, votes


class RankVote(Strategy):
    name = "rank_vote"

    def support(self, x: torch.Tensor, probs: torch.Tensor, w: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        a = x.shape[-1]
        # Best action first; a stable sort keeps the lower index first among equal logits.
        order = torch.sort(x, dim=-1, descending=True, stable=True).indices
        points = torch.arange(a, 0, -1, dtype=x.dtype).expand_as(x).contiguous()
        ranks = torch.empty_like(x).scatter_(-1, order, points)
        ranks = _weighted(ranks, w)
        return ranks, ranks


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (SumProbs, BoltzmannAddition, BoltzmannMultiplication, MajorityVote,
                        RankVote)
}


def create(strategy: str, seed: int = 0, temperature: float = 1.0) -> Strategy:
    """The aggregation rule named in `aggregate.strategy`."""
    return STRATEGIES[strategy](seed, temperature)
