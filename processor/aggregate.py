"""Aggregation: many windows' logits in, one action per environment and credits out.

`sum_probs`, the seed's rule (swergio RLGym example, `get_action`), exactly:
    p_m = softmax(logits_m)            per model m, in float32 as torch computes it
    P   = sum_m p_m
    a   = argmax(P) (ties: lowest index) if deterministic, else a ~ Categorical(P / sum P)
    credit_m = p_m[a] / P[a]           (sums to 1 over the models of one environment step)

Windows are aggregated together: all windows of one shape (M models, B environments,
A actions) become one (W, M, B, A) tensor and one pass of torch, so the cost per window
falls as bursts grow. Sampling uses the worker's own seeded generator, so a run whose
messages arrive in the same order replays the same actions.
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


class SumProbs:
    """The seed's aggregation rule, vectorised over windows."""

    name = "sum_probs"

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, stacks: Sequence[np.ndarray],
                 deterministic: Sequence[bool]) -> list[Result]:
        """Aggregate windows; `stacks[i]` is window i's float32 logits of shape (M, B, A)."""
        results: list[Result | None] = [None] * len(stacks)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(stacks):
            groups.setdefault(s.shape, []).append(i)
        for idx in groups.values():
            x = torch.from_numpy(np.stack([stacks[i] for i in idx]))   # (W, M, B, A)
            det = torch.tensor([deterministic[i] for i in idx])
            actions, credit = self._kernel(x, det)
            for j, i in enumerate(idx):
                results[i] = Result(actions[j], credit[j])
        return results  # type: ignore[return-value]

    def _kernel(self, x: torch.Tensor, det: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        probs = torch.softmax(x, dim=-1)                 # (W, M, B, A)
        total = probs.sum(dim=1)                         # (W, B, A)
        actions = torch.argmax(total, dim=-1)            # (W, B)
        if not bool(det.all()):
            rows = ~det
            t = total[rows]                              # (w, B, A)
            drawn = torch.multinomial(t.reshape(-1, t.shape[-1]), 1, generator=self.generator)
            actions[rows] = drawn.reshape(t.shape[0], t.shape[1])
        w, m, b, _ = probs.shape
        idx = actions.reshape(w, 1, b, 1).expand(w, m, b, 1)
        chosen = probs.gather(-1, idx).squeeze(-1)                       # (W, M, B)
        chosen_total = total.gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # (W, B)
        credit = chosen / chosen_total.unsqueeze(1)
        return actions.numpy(), credit.numpy()


STRATEGIES = {"sum_probs": SumProbs}


def create(strategy: str, seed: int) -> SumProbs:
    """The aggregation rule named in `aggregate.strategy`."""
    return STRATEGIES[strategy](seed)
