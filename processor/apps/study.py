"""A study users can rerun: which aggregation rule serves a mixed swarm best, and whose
contribution ranking tells the good models from the bad?

The demo's toy environment (each step hides a target action per environment; reward 1 for
hitting it) with a swarm of three kinds of models:

- good: know the target with probability 0.6 to 0.9 (the demo's models),
- noisy: know it with probability 0.1 to 0.3, otherwise favour a random action,
- adversarial: always push one wrong action with high confidence (logit +8).

True quality is each model's own hit rate (its argmax equals the target), measured in the
same run. For every rule of `processor.aggregate`, in deterministic (argmax) and sampling
mode, the study reports the swarm's reward rate and the Spearman rank correlation between
the contribution ledger and true quality. With matplotlib installed (the `study` extra) it
writes a PNG: reward per rule, and each model's contribution share over time.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..aggregate import STRATEGIES, create
from ..ledger import Ledger
from .demo import toy_logits


@dataclass
class Swarm:
    names: list[str]
    kinds: list[str]
    skill: np.ndarray  # for good and noisy models; adversaries ignore it


def mixed_swarm(good: int, noisy: int, adversarial: int, seed: int) -> Swarm:
    rng = np.random.default_rng(seed)
    skill = np.concatenate([rng.uniform(0.6, 0.9, good), rng.uniform(0.1, 0.3, noisy),
                            np.zeros(adversarial)])
    kinds = ["good"] * good + ["noisy"] * noisy + ["adversarial"] * adversarial
    names = [f"{k[:3]}-{i:02d}" for i, k in enumerate(kinds)]
    return Swarm(names, kinds, skill)


def swarm_logits(rng: np.random.Generator, swarm: Swarm, target: np.ndarray,
                 actions: int) -> np.ndarray:
    logits = toy_logits(rng, swarm.skill, target, actions)
    adv = np.array([k == "adversarial" for k in swarm.kinds])
    if adv.any():
        wrong = (target + 1 + rng.integers(actions - 1, size=target.shape)) % actions
        x = rng.normal(0.0, 1.0, (int(adv.sum()), len(target), actions))
        np.put_along_axis(x, np.broadcast_to(wrong[None, :, None], x.shape[:2] + (1,)),
                          8.0, axis=2)
        logits[adv] = x
    return logits


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (ties broken by order; fine for continuous scores)."""
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass
class Run:
    strategy: str
    deterministic: bool
    reward: float = 0.0
    rank_correlation: float = 0.0
    contribution: dict[str, float] = field(default_factory=dict)
    shares: list[list[float]] = field(default_factory=list)  # per period, per model


def run_one(strategy: str, deterministic: bool, swarm: Swarm, steps: int, actions: int,
            batch: int, seed: int, period: int) -> tuple[Run, np.ndarray]:
    rng = np.random.default_rng(seed)
    rule = create(strategy, seed, 1.0)
    ledger, run = Ledger(), Run(strategy, deterministic)
    hits = 0
    own_hits = np.zeros(len(swarm.names))
    totals = np.zeros(len(swarm.names))
    chunk = 64  # windows aggregated per call, as the worker does for a burst
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        targets = [rng.integers(actions, size=batch) for _ in range(n)]
        stacks = [swarm_logits(rng, swarm, t, actions).astype(np.float32) for t in targets]
        for t, x, r in zip(targets, stacks, rule(stacks, [deterministic] * n)):
            hits += int((r.actions == t).sum())
            own_hits += (x.argmax(-1) == t[None, :]).sum(axis=1)
            ledger.add(swarm.names, r.credit, r.agree)
            done += 1
            if done % period == 0:
                c = ledger.take()["CONTRIBUTION"]
                vec = np.array([c.get(m, 0.0) for m in swarm.names])
                totals += vec
                run.shares.append((vec / max(vec.sum(), 1e-12)).tolist())
    rest = ledger.take()["CONTRIBUTION"]
    totals += np.array([rest.get(m, 0.0) for m in swarm.names])
    run.reward = hits / (steps * batch)
    quality = own_hits / (steps * batch)
    run.rank_correlation = spearman(totals, quality)
    run.contribution = dict(zip(swarm.names, totals.tolist()))
    return run, quality


def plot(runs: list[Run], swarm: Swarm, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    det = [r for r in runs if r.deterministic]
    smp = {r.strategy: r for r in runs if not r.deterministic}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    names = [r.strategy for r in det]
    xpos = np.arange(len(names))
    axes[0].bar(xpos - 0.2, [r.reward for r in det], 0.4, label="argmax")
    axes[0].bar(xpos + 0.2, [smp[n].reward for n in names], 0.4, label="sampling")
    axes[0].set_xticks(xpos, [n.replace("_", "\n") for n in names], fontsize=8)
    axes[0].set_ylabel("reward per environment step")
    axes[0].set_title("reward per rule")
    axes[0].legend()
    ref = next(r for r in det if r.strategy == "sum_probs")
    shares = np.array(ref.shares)
    colors = {"good": "tab:green", "noisy": "tab:gray", "adversarial": "tab:red"}
    for i, k in enumerate(swarm.kinds):
        axes[1].plot(shares[:, i], color=colors[k], alpha=0.8,
                     label=k if swarm.kinds.index(k) == i else None)
    axes[1].set_xlabel("period (GET)")
    axes[1].set_ylabel("contribution share")
    axes[1].set_title("sum_probs, argmax: contribution share per model over time")
    axes[1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def markdown_table(runs: list[Run]) -> str:
    """The README's table: one row per rule, argmax and sampling side by side."""
    by = {(r.strategy, r.deterministic): r for r in runs}
    lines = ["| strategy | reward, argmax | rank corr., argmax | reward, sample "
             "| rank corr., sample |", "|---|---|---|---|---|"]
    for name in dict.fromkeys(r.strategy for r in runs):
        det, smp = by[(name, True)], by[(name, False)]
        lines.append(f"| {name} | {det.reward:.3f} | {det.rank_correlation:.3f} "
                     f"| {smp.reward:.3f} | {smp.rank_correlation:.3f} |")
    return "\n".join(lines)


def run_study(steps: int = 3000, actions: int = 6, batch: int = 1, good: int = 4,
              noisy: int = 4, adversarial: int = 2, seed: int = 0, period: int = 100,
              png: str | None = None, json_path: str | None = None,
              out: TextIO = sys.stdout, markdown: bool = False) -> list[Run]:
    swarm = mixed_swarm(good, noisy, adversarial, seed)
    runs: list[Run] = []
    quality = np.zeros(0)
    for name in STRATEGIES:
        for det in (True, False):
            r, quality = run_one(name, det, swarm, steps, actions, batch, seed, period)
            runs.append(r)
    print(f"study: {good} good, {noisy} noisy, {adversarial} adversarial models; "
          f"{steps} steps, {actions} actions, batch {batch}, seed {seed}", file=out)
    print("model quality (own hit rate): " + ", ".join(
        f"{n} {q:.2f}" for n, q in zip(swarm.names, quality)), file=out)
    if markdown:  # the README's table is this output, pasted (tests/test_readme.py checks)
        print(markdown_table(runs), file=out)
    else:
        print(f"{'strategy':<26} {'mode':<9} {'reward':>7} {'rank corr.':>11}", file=out)
        for r in runs:
            print(f"{r.strategy:<26} {'argmax' if r.deterministic else 'sample':<9} "
                  f"{r.reward:7.3f} {r.rank_correlation:11.3f}", file=out)
    if json_path:
        payload: dict[str, Any] = {
            "swarm": {"names": swarm.names, "kinds": swarm.kinds,
                      "quality": quality.tolist()},
            "runs": [{"strategy": r.strategy, "deterministic": r.deterministic,
                      "reward": r.reward, "rank_correlation": r.rank_correlation,
                      "contribution": r.contribution} for r in runs]}
        Path(json_path).write_text(json.dumps(payload, indent=1))
    if png:
        if plot(runs, swarm, Path(png)):
            print(f"plot written to {png}", file=out)
        else:
            print("no plot: matplotlib is not installed (pip install "
                  "'swarm-aggregator[study]')", file=out)
    return runs
