"""The environment: B Gymnasium CartPole-v1 environments stepped by the swarm's actions.

Each step it publishes the B observations on `observation` (with the previous step's
actions, rewards and ends, which the models train on), waits for the worker's action
under the step key (`ENV_ID`, `STEP`), and steps every environment with its entry of
ACTION; an environment whose episode ends is reset at once and its return recorded. Every
`evolve_every` steps, between two steps, it runs an evolution round. One step is in flight
at a time: the pipeline runs in lockstep.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from .common import CONTROL, ENV_ID, OBSERVATION
from .evolution import Evolution, Round

HANDSHAKE_EVERY_S = 0.2
ACTION_TIMEOUT_S = 30.0   # longer than the worker's window deadline (10 s)
REWARD_WINDOW = 20        # episodes in the running mean


class CartPoles:
    """B CartPole-v1 environments stepping together; an ended episode restarts at once."""

    def __init__(self, envs: int, seed: int) -> None:
        import gymnasium as gym

        self.envs = [gym.make("CartPole-v1") for _ in range(envs)]
        self.obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(self.envs)])
        self.returns = np.zeros(envs)
        self.episodes: list[float] = []

    def step(self, actions: list[int]) -> tuple[list[float], list[bool], dict[str, list[float]]]:
        """Rewards, episode ends, and the last observation of each episode cut by the time
        limit (by row), for the models to bootstrap from."""
        rewards, dones, final = [], [], {}
        for i, (env, a) in enumerate(zip(self.envs, actions)):
            obs, reward, terminated, truncated, _ = env.step(int(a))
            self.returns[i] += float(reward)
            if terminated or truncated:
                if truncated and not terminated:
                    final[str(i)] = [float(x) for x in obs]
                self.episodes.append(float(self.returns[i]))
                self.returns[i] = 0.0
                obs, _ = env.reset()
            self.obs[i] = obs
            rewards.append(float(reward))
            dones.append(bool(terminated or truncated))
        return rewards, dones, final


@dataclass
class Result:
    steps: int = 0             # swarm steps (each one action for B environments)
    answered: int = 0          # steps whose action came
    partial: int = 0           # of those, closed at the worker's deadline without all models
    seconds: float = 0.0       # from the first observation to the last action
    warm_steps: int = 0        # steps after the warm-up ...
    warm_seconds: float = 0.0  # ... and their time
    rounds: list[Round] = field(default_factory=list)
    episodes: list[float] = field(default_factory=list)
    stopped: bool = False      # Ctrl-C before the last step


class Runner:
    """The environment's side of a run, on one swarm connection."""

    def __init__(self, swarm: Any, models: list[str], envs: int, seed: int,
                 evolution_mode: str, noise: float, eval_steps: int, out: TextIO | None,
                 check: Callable[[], None], stop: threading.Event) -> None:
        self.swarm = swarm
        self.models = models
        self.b = envs
        self.seed = seed
        self.out = out
        self.check = check  # raises when a process of the run has died
        self.stop = stop
        self.env = swarm.environment()
        self.control = swarm.subscribe(CONTROL)
        self.eval_steps = eval_steps
        self.evolution = Evolution(swarm, self.control, models, evolution_mode, noise,
                                   eval_steps)
        self.byes: dict[str, dict[str, Any]] = {}

    def say(self, text: str) -> None:
        if self.out is not None:
            print(text, file=self.out, flush=True)

    def handshake(self, timeout: float) -> None:
        """Wait until the worker answers and every model hears `observation` and is heard
        on `control` (ZeroMQ's slow joiner, rooms joined, subscriptions in place)."""
        end = time.monotonic() + timeout
        while True:
            try:
                self.swarm.ready(timeout=1.0)
                break
            except TimeoutError:
                self.check()
                if time.monotonic() > end:
                    raise
        waiting, nonce = set(self.models), int(time.time())
        while waiting:
            self.check()
            if self.stop.is_set():
                return
            if time.monotonic() > end:
                raise TimeoutError(f"models {sorted(waiting)} did not answer within "
                                   f"{timeout:g} s")
            self.swarm.publish(OBSERVATION, {"HELLO": nonce})
            until = time.monotonic() + HANDSHAKE_EVERY_S
            while waiting and time.monotonic() < until:
                self.swarm.pump(max(0.0, until - time.monotonic()))
                for msg in self.control.drain():
                    if isinstance(msg, dict) and msg.get("HELLO") == nonce:
                        waiting.discard(str(msg.get("MODEL")))

    def run(self, steps: int, evolve_every: int, warmup: int, deterministic: bool,
            mark: Callable[[], None] = lambda: None, progress_s: float = 1.0) -> Result:
        """`steps` steps, sampled actions unless `deterministic`; a round every
        `evolve_every` steps, ranking the models on the `eval_steps` steps before it, which
        take argmax actions (none: on all the steps since the previous round). `mark` is
        called at the end of the warm-up and at the end of the steps."""
        res = Result()
        envs = CartPoles(self.b, self.seed)
        res.episodes = envs.episodes
        last: dict[str, Any] = {}
        t0 = last_print = time.monotonic()
        t_warm = t0
        step = 0
        eval_steps = self.eval_steps
        limit = steps or sys.maxsize  # 0: until Ctrl-C
        while step < limit and not self.stop.is_set():
            evaluating = False
            if evolve_every and eval_steps:
                next_round = (step // evolve_every + 1) * evolve_every
                evaluating = next_round < limit and step >= next_round - eval_steps
                if evaluating and step == next_round - eval_steps:
                    self.evolution.take()  # the training steps' credit, before the ranking's
            key = {"ENV_ID": ENV_ID, "STEP": step}
            self.swarm.publish(OBSERVATION, {**key, "OBSERVATION": envs.obs.tolist(),
                                             "DETERMINISTIC": deterministic or evaluating,
                                             **last})
            action = self._action(key)
            res.answered += 1
            res.partial += int(bool(action.get("PARTIAL")))
            actions = list(action["ACTION"])
            if len(actions) != self.b:
                raise RuntimeError(f"step {step}: {len(actions)} actions for {self.b} "
                                   "environments")
            rewards, dones, final = envs.step(actions)
            last = {"ACTION": actions, "REWARD": rewards, "DONE": dones}
            if final:
                last["FINAL"] = final
            step += 1
            res.steps = step
            if step == warmup:
                mark()
                t_warm = time.monotonic()
            if evolve_every and step % evolve_every == 0 and step < limit:
                self._report_round(self.evolution.round(step))
            now = time.monotonic()
            if now - last_print >= progress_s:
                last_print = now
                self._progress(step, steps, now - t0, envs.episodes)
        end = time.monotonic()
        res.seconds = end - t0
        if step > warmup:
            mark()
            res.warm_steps, res.warm_seconds = step - warmup, end - t_warm
        res.stopped = step < limit
        res.rounds = self.evolution.rounds
        return res

    def _action(self, key: dict[str, Any]) -> dict[str, Any]:
        end = time.monotonic() + ACTION_TIMEOUT_S
        while True:
            try:
                return dict(self.env.wait(key, timeout=min(1.0, end - time.monotonic())))
            except TimeoutError:
                self.check()
                if time.monotonic() >= end:
                    raise TimeoutError(f"no action for step {key['STEP']} within "
                                       f"{ACTION_TIMEOUT_S:g} s") from None

    def _progress(self, step: int, steps: int, seconds: float, episodes: list[float]) -> None:
        recent = episodes[-REWARD_WINDOW:]
        reward = f"{np.mean(recent):6.1f}" if recent else "     -"
        self.say(f"step {step:>6}{f'/{steps}' if steps else ''}  {step / seconds:7.1f} steps/s  "
                 f"{step * self.b / seconds:8.1f} env steps/s  episodes {len(episodes):>5}  "
                 f"reward (last {REWARD_WINDOW}) {reward}")

    def _report_round(self, r: Round) -> None:
        total = sum(r.contribution.values()) or 1.0
        best, worst = r.ranking[0], r.ranking[-1]
        what = []
        if r.copied:
            what.append(f"{r.copied[0]}'s weights copied to {r.copied[1]}")
        if r.weights:
            what.append("aggregation weights set by rank")
        self.say(f"evolution round {r.number} at step {r.step} ({r.basis}): best {best} "
                 f"({100 * r.contribution.get(best, 0.0) / total:.1f}%), worst {worst} "
                 f"({100 * r.contribution.get(worst, 0.0) / total:.1f}%); "
                 f"{', '.join(what) or 'nothing to do'} ({1000 * r.seconds:.0f} ms)")

    def finish(self, timeout: float = 30.0) -> dict[str, float]:
        """STOP to the models, the last GET (the steps since the last round), and each
        model's account of itself (BYE)."""
        self.swarm.publish(OBSERVATION, {"STOP": True})
        contribution = self.evolution.take()
        end = time.monotonic() + timeout
        while len(self.byes) < len(self.models) and time.monotonic() < end:
            self.swarm.pump(max(0.0, min(0.5, end - time.monotonic())))
            for msg in self.control.drain():
                if isinstance(msg, dict) and "BYE" in msg:
                    self.byes[str(msg["BYE"])] = msg
        return contribution


def leaderboard(evolution: Evolution, byes: dict[str, dict[str, Any]]) -> list[str]:
    """The run's contributions, best first: the whole run's, the share of the steps the
    rounds ranked on, how often each model ranked first and last, its updates."""
    total = sum(evolution.total.values()) or 1.0
    ranked = sum(evolution.ranked.values()) or 1.0
    lines = [f"{'rank':>4}  {'model':<10} {'contribution':>12}  {'share':>6}  "
             f"{'ranked share':>12}  {'best':>4}  {'worst':>5}  {'updates':>7}"]
    counts = evolution.total
    for i, m in enumerate(sorted(counts, key=lambda k: (-counts[k], k)), 1):
        updates = byes.get(m, {}).get("UPDATES", "-")
        lines.append(f"{i:>4}  {m:<10} {counts[m]:>12.2f}  {100 * counts[m] / total:>5.1f}%  "
                     f"{100 * evolution.ranked.get(m, 0.0) / ranked:>11.1f}%  "
                     f"{evolution.best.get(m, 0):>4}  {evolution.worst.get(m, 0):>5}  "
                     f"{updates:>7}")
    return lines
