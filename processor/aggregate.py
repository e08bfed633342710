"""Aggregation: many windows' logits in, one action per environment and credits out.

Every rule works on a (W, M, B, A) float32 tensor (windows, models, environments, actions)
in one pass of torch, so the cost per window falls as bursts grow. Each rule defines

    support[m, a]  what model m gives to action a (>= 0)
    score[a]       the rule's preference: argmax in deterministic mode (ties: lowest index)
    policy         the distribution sampled from otherwise (the worker's seeded generator)
    credit[m]      support[m, a] / sum_k support[k, a] for the action a taken: it sums to 1
                   over the models of one environment step

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

torch.set_num_threads(1)  # small tensors: threads cost more than they save, and steal a core


@dataclass(slots=True)
class Result:
    actions: np.ndarray  # int64, shape (B,)
    credit: np.ndarray   # float32, shape (M, B): model m's share of environment b's action
    agree: np.ndarray    # bool, shape (M, B): model m's own argmax was the action taken


class Strategy:
    """Shared frame of the rules: grouping by shape, argmax or sampling, credit."""

    name = ""

    def __init__(self, seed: int = 0, temperature: float = 1.0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
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

        Returns actions (W, B) int64, credit (W, M, B) float32, agree (W, M, B) bool.
        """
        return self._run(torch.from_numpy(x), torch.from_numpy(det),
                         None if w is None else torch.from_numpy(w))

    def _run(self, x: torch.Tensor, det: torch.Tensor, w: torch.Tensor | None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probs = torch.softmax(x, dim=-1)                                 # (W, M, B, A)
        support, score = self.support(x, probs, w)
        actions = torch.argmax(score, dim=-1)                            # (W, B)
        if not bool(det.all()):
            if not bool(det.any()):   # all sampled: no masking
                actions = self.sample(score, support)
            else:
                rows = ~det
                actions[rows] = self.sample(score[rows], support[rows])
        w_, m, b, _ = probs.shape
        idx = actions.reshape(w_, 1, b, 1).expand(w_, m, b, 1)
        chosen = support.gather(-1, idx).squeeze(-1)                     # (W, M, B)
        total = chosen.sum(dim=1, keepdim=True)
        if bool((total <= 0).any()):
            # Nobody supported the action taken (a sampled action no model voted for):
            # fall back to each model's probability of it.
            weighted = probs if w is None else probs * w[:, :, None, None]
            fallback = weighted.gather(-1, idx).squeeze(-1)
            chosen = torch.where(total > 0, chosen, fallback)
            total = chosen.sum(dim=1, keepdim=True)
        credit = chosen / total
        agree = x.argmax(dim=-1) == actions.unsqueeze(1)                 # (W, M, B)
        return actions.numpy(), credit.numpy(), agree.numpy()

    def support(self, x: torch.Tensor, probs: torch.Tensor, w: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(support (W, M, B, A), score (W, B, A)) of this rule."""
        raise NotImplementedError

    def sample(self, score: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Draw one action per environment from score (w, B, A): softmax(score / T)."""
        policy = torch.softmax(score / self.temperature, dim=-1)
        return self._draw(policy)

    def _draw(self, policy: torch.Tensor) -> torch.Tensor:
        """One draw per row of unnormalised weights (w, B, A), by the inverse of the CDF.

        A uniform u in [0, total) picks the first action whose cumulative weight exceeds
        it, so an action of weight 0 is never drawn. (torch.multinomial does the same job
        at several times the cost for one row.)
        """
        cdf = policy.cumsum(dim=-1)
        u = torch.rand(cdf.shape[:-1], generator=self.generator) * cdf[..., -1]
        drawn = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1)
        return drawn.clamp_(max=cdf.shape[-1] - 1)


def _weighted(probs: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return probs if w is None else probs * w[:, :, None, None]


class SumProbs(Strategy):
    name = "sum_probs"

    def support(self, x: torch.Tensor, probs: torch.Tensor, w: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        s = _weighted(probs, w)
        return s, s.sum(dim=1)

    def sample(self, score: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        # Categorical(P / sum P), as the seed.
        return self._draw(score)


class BoltzmannAddition(SumProbs):
    name = "boltzmann_addition"

    def sample(self, score: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        if self.temperature == 1.0:
            return self._draw(score)
        return self._draw(torch.softmax(torch.log(score) / self.temperature, dim=-1))


class BoltzmannMultiplication(Strategy):
    name = "boltzmann_multiplication"

    def support(self, x: torch.Tensor, probs: torch.Tensor, w: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        xs = x if w is None else x * w[:, :, None, None]
        return _weighted(probs, w), xs.sum(dim=1)


class MajorityVote(Strategy):
    name = "majority_vote"

    def support(self, x: torch.Tensor, probs: torch.Tensor, w: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        votes = torch.zeros_like(x).scatter_(-1, x.argmax(dim=-1, keepdim=True), 1.0)
        votes = _weighted(votes, w)
        return votes, votes.sum(dim=1)


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
        return ranks, ranks.sum(dim=1)


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (SumProbs, BoltzmannAddition, BoltzmannMultiplication, MajorityVote,
                        RankVote)
}


def create(strategy: str, seed: int = 0, temperature: float = 1.0) -> Strategy:
    """The aggregation rule named in `aggregate.strategy`."""
    return STRATEGIES[strategy](seed, temperature)
