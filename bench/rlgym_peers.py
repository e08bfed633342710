"""The RLGym example's other components, for `bench.swergio_server_bench`, each run as its
own process: `python -m bench.rlgym_peers ROLE --port PORT [options]`.

Written after the swergio RLGym example's components (environment, model, evolution),
with swergio's own `Client`, `Trigger` and `add_eventHandler` used as they use them, so
on the wire they are what the example's are: every frame as two writes (header, then
body) with Nagle's algorithm on, the handlers' replies with ROOT_ID, MODEL_STATUS and
SENT_BY propagated, every model registered under the NAME `model`, and each client in the
rooms its handlers trigger on and answer to. What differs, so that no gym, torch or deap
is needed and a run takes seconds:

- environment: CartPole's equations of motion written out here (not gym's), and a run
  of a given number of steps (`NR_OF_STEPS`, resetting at the end of each episode)
  instead of a number of episodes, so every configuration measures the same work;
- model: the example's policy network shape (4 -> 16 -> 16 -> 2 logits, and the value
  head) as a numpy forward pass with seeded weights, no training; or with `--torch`, an
  actor-critic of that shape in torch that learns as the example's A2C does in outline (a
  forward pass per step; every 5 steps, returns and advantages over those 5 steps, the
  policy-gradient and value losses, backward, gradient clipping, an Adam step), so the
  models cost what the example's cost, give or take stable-baselines3's own overhead;
- evolution: asks for weights and contributions on `{"EVOLUTION": true}` in `control`,
  and once all have come, answers `CMD: SET` with the weights of the best models, as the
  example's deap loop does in outline;
- echo: a client that answers each message in room `ping` in room `pong` (round trips).
"""

from __future__ import annotations

import argparse
import math
import socket
import sys
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from swergio import MESSAGE_TYPE, Client, Trigger

FORMAT = "utf-8"
HEADER_LENGTH = 10
CUSTOM = MESSAGE_TYPE.DATA.CUSTOM


class CartPole:
    """Cart and pole (Barto, Sutton and Anderson, 1983) integrated with Euler steps of 20 ms:
    the state is the cart's position and speed, the pole's angle and angular speed."""

    GRAVITY, CART, POLE, HALF_LENGTH, FORCE, TAU = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    X_LIMIT, ANGLE_LIMIT, MAX_STEPS = 2.4, 12 * 2 * math.pi / 360, 500

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.state = [0.0, 0.0, 0.0, 0.0]
        self.t = 0

    def reset(self) -> list[float]:
        self.state = self.rng.uniform(-0.05, 0.05, 4).tolist()
        self.t = 0
        return list(self.state)

    def step(self, action: int) -> tuple[list[float], float, bool]:
        x, v, th, w = self.state
        force = self.FORCE if action == 1 else -self.FORCE
        total = self.CART + self.POLE
        cos, sin = math.cos(th), math.sin(th)
        tmp = (force + self.POLE * self.HALF_LENGTH * w * w * sin) / total
        alpha = (self.GRAVITY * sin - cos * tmp) / (
            self.HALF_LENGTH * (4.0 / 3.0 - self.POLE * cos * cos / total))
        acc = tmp - self.POLE * self.HALF_LENGTH * alpha * cos / total
        x, v = x + self.TAU * v, v + self.TAU * acc
        th, w = th + self.TAU * w, w + self.TAU * alpha
        self.state = [x, v, th, w]
        self.t += 1
        done = abs(x) > self.X_LIMIT or abs(th) > self.ANGLE_LIMIT or self.t >= self.MAX_STEPS
        return list(self.state), 1.0, done


class Policy:
    """The example's actor-critic shape: two 16-unit tanh layers for the logits, two for
    the value, as a numpy forward pass."""

    SHAPES = ((4, 16), (16,), (16, 16), (16,), (16, 2), (2,),      # actor
              (4, 16), (16,), (16, 16), (16,), (16, 1), (1,))      # critic

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.params = [rng.normal(0, 0.5, s).astype(np.float32) for s in self.SHAPES]

    def logits(self, obs: list[float]) -> list[float]:
        p = self.params
        x = np.asarray(obs, dtype=np.float32)
        h = np.tanh(np.tanh(x @ p[0] + p[1]) @ p[2] + p[3])
        np.tanh(np.tanh(x @ p[6] + p[7]) @ p[8] + p[9]) @ p[10] + p[11]  # the value head
        out: list[float] = (h @ p[4] + p[5]).tolist()
        return out

    def vector(self) -> list[float]:
        out: list[float] = np.concatenate([q.ravel() for q in self.params]).tolist()
        return out

    def load(self, vector: Sequence[float]) -> None:
        flat = np.asarray(vector, dtype=np.float32)
        at = 0
        for i, q in enumerate(self.params):
            self.params[i] = flat[at:at + q.size].reshape(q.shape)
            at += q.size


class TorchPolicy:
    """The example's model in outline: an actor-critic (two 16-unit tanh layers each) that
    acts on every observation and trains on every 5 steps it has seen."""

    ROLLOUT, GAMMA, VF_COEF, MAX_GRAD_NORM, LR = 5, 0.99, 0.5, 0.5, 7e-4

    def __init__(self, seed: int) -> None:
        import torch
        from torch import nn

        torch.manual_seed(seed)
        self.torch = torch
        self.pi = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.vf = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.action_net, self.value_net = nn.Linear(16, 2), nn.Linear(16, 1)
        self.modules = (self.pi, self.vf, self.action_net, self.value_net)
        self.params = [q for m in self.modules for q in m.parameters()]
        self.optimizer = torch.optim.Adam(self.params, lr=self.LR)
        self.rollout: list[tuple[Any, int, float, bool]] = []  # obs, action, reward, start
        self.last: tuple[Any, bool] | None = None  # the previous observation, episode start

    def act(self, msg: dict[str, Any]) -> list[float]:
        torch = self.torch
        if len(self.rollout) >= self.ROLLOUT:
            self._train(msg)
        if "REWARD" in msg and self.last is not None:
            self.rollout.append((self.last[0], int(msg["ACTION"][0]), float(msg["REWARD"]),
                                 self.last[1]))
        obs = torch.tensor(msg["OBSERVATION"], dtype=torch.float32).unsqueeze(0)
        with torch.no_grad():
            logits = self.action_net(self.pi(obs))
            self.value_net(self.vf(obs))
        self.last = (obs, bool(msg.get("DONE", True)))
        out: list[float] = logits[0].tolist()
        return out

    def _train(self, msg: dict[str, Any]) -> None:
        torch = self.torch
        obs = torch.cat([o for o, _, _, _ in self.rollout])
        actions = torch.tensor([a for _, a, _, _ in self.rollout])
        with torch.no_grad():
            nxt = torch.tensor(msg["OBSERVATION"], dtype=torch.float32).unsqueeze(0)
            future = 0.0 if msg.get("DONE") else float(self.value_net(self.vf(nxt)))
        returns = []
        for _, _, reward, _ in reversed(self.rollout):
            future = reward + self.GAMMA * future
            returns.append(future)
        target = torch.tensor(returns[::-1])
        values = self.value_net(self.vf(obs)).flatten()
        dist = torch.distributions.Categorical(logits=self.action_net(self.pi(obs)))
        advantages = target - values.detach()
        loss = -(advantages * dist.log_prob(actions)).mean() + \
            self.VF_COEF * torch.nn.functional.mse_loss(target, values)
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.MAX_GRAD_NORM)
        self.optimizer.step()
        self.rollout.clear()

    def vector(self) -> list[float]:
        out: list[float] = self.torch.cat([q.detach().flatten() for q in self.params]).tolist()
        return out

    def load(self, vector: Sequence[float]) -> None:
        flat = self.torch.tensor(vector, dtype=self.torch.float32)
        at = 0
        with self.torch.no_grad():
            for q in self.params:
                q.copy_(flat[at:at + q.numel()].reshape(q.shape))
                at += q.numel()


def client(name: str, host: str, port: int, **kwargs: Any) -> Client:
    return Client(name, host, port, FORMAT, HEADER_LENGTH, **kwargs)


def close(c: Client, reader: threading.Thread) -> None:
    """Shut a swergio Client's socket (its listening thread then ends) and join the thread."""
    try:
        c.client.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    c.client.close()
    reader.join(5)


def run_model(host: str, port: int, index: int, torch: bool) -> None:
    component_id = f"model-{index}"
    policy: Policy | TorchPolicy = TorchPolicy(1000 + index) if torch else Policy(1000 + index)
    c = client("model", host, port, policy=policy)

    # swergio hands the client's keyword arguments to handlers by parameter name.
    def forward(msg: dict[str, Any], policy: Policy | TorchPolicy) -> dict[str, Any]:
        logits = policy.act(msg) if isinstance(policy, TorchPolicy) else \
            policy.logits(msg["OBSERVATION"])
        return {"LOGITS": logits, "COMPONENT_ID": component_id,
                "DETERMINISTIC": msg["DETERMINISTIC"]}

    def send_weights(msg: dict[str, Any], policy: Policy | TorchPolicy
                     ) -> dict[str, Any] | None:
        if msg.get("CMD") == "GET":
            return {"WEIGHTS": policy.vector(), "COMPONENT_ID": component_id}
        return None

    def set_weights(msg: dict[str, Any], policy: Policy | TorchPolicy) -> None:
        if msg.get("CMD") == "SET":
            policy.load(msg["WEIGHTS"][component_id])

    c.add_eventHandler(forward, CUSTOM, responseRooms="logits",
                       trigger=Trigger(CUSTOM, "observation"))
    c.add_eventHandler(send_weights, CUSTOM, responseRooms="evolution",
                       trigger=Trigger(CUSTOM, "evolution"))
    c.add_eventHandler(set_weights, CUSTOM, responseRooms="evolution",
                       trigger=Trigger(CUSTOM, "evolution"))
    c.listen()


def run_environment(host: str, port: int, seed: int) -> None:
    env = CartPole(seed)
    run: dict[str, Any] = {"left": 0, "steps": 0, "episodes": 0, "deterministic": False}
    c = client("environment", host, port, env=env, run=run)

    def start(msg: dict[str, Any], env: CartPole, run: dict[str, Any]) -> dict[str, Any] | None:
        if "NR_OF_STEPS" not in msg:
            return None
        run.update(left=int(msg["NR_OF_STEPS"]), steps=0, episodes=0,
                   deterministic=bool(msg.get("DETERMINISTIC", False)))
        return {"OBSERVATION": env.reset(), "DETERMINISTIC": run["deterministic"]}

    def next_observation(msg: dict[str, Any], env: CartPole, run: dict[str, Any]
                         ) -> dict[str, Any] | None:
        if run["left"] <= 0:
            return None
        action = msg["ACTION"]
        obs, reward, done = env.step(int(action[0]))
        run["left"] -= 1
        run["steps"] += 1
        if done:
            run["episodes"] += 1
            obs = env.reset()
        if run["left"] == 0:
            c.send({"ROOT_ID": uuid.uuid4().hex, "ID": uuid.uuid4().hex, "TYPE": CUSTOM.id,
                    "STATUS": "ENV_DONE", "STEPS": run["steps"],
                    "EPISODES": run["episodes"], "TO_ROOM": "control"})
            return None
        return {"OBSERVATION": obs, "REWARD": reward, "DONE": done,
                "DETERMINISTIC": run["deterministic"], "ACTION": action}

    c.add_eventHandler(start, CUSTOM, responseRooms="observation",
                       trigger=Trigger(CUSTOM, "control"))
    c.add_eventHandler(next_observation, CUSTOM, responseRooms="observation",
                       trigger=Trigger(CUSTOM, "action"))
    c.listen()


def run_evolution(host: str, port: int, models: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    weights: dict[str, list[float]] = {}
    contribution: dict[str, float] = {}
    c = client("evolution", host, port, weights=weights, contribution=contribution)

    def get_infos(msg: dict[str, Any]) -> dict[str, Any] | None:
        return {"CMD": "GET"} if msg.get("EVOLUTION") else None

    def evolve(msg: dict[str, Any], weights: dict[str, list[float]],
               contribution: dict[str, float]) -> dict[str, Any] | None:
        if "WEIGHTS" in msg and "COMPONENT_ID" in msg:
            weights[msg["COMPONENT_ID"]] = msg["WEIGHTS"]
        if "CONTRIBUTION" in msg:
            contribution.update(msg["CONTRIBUTION"])
        if len(weights) < models or len(contribution) < models:
            return None
        ranked = sorted(weights, key=lambda k: contribution.get(k, 0.0), reverse=True)
        best = ranked[: max(1, models // 2)]
        new = {k: (np.asarray(weights[best[i % len(best)]])
                   + rng.normal(0, 0.01, len(weights[k]))).tolist()
               for i, k in enumerate(ranked)}
        weights.clear()
        contribution.clear()
        c.send({"ROOT_ID": uuid.uuid4().hex, "ID": uuid.uuid4().hex, "TYPE": CUSTOM.id,
                "STATUS": "EVO_DONE", "TO_ROOM": "control"})
        return {"CMD": "SET", "WEIGHTS": new}

    c.add_eventHandler(get_infos, CUSTOM, responseRooms="evolution",
                       trigger=Trigger(CUSTOM, "control"))
    c.add_eventHandler(evolve, CUSTOM, responseRooms="evolution",
                       trigger=Trigger(CUSTOM, "evolution"))
    c.listen()


def run_echo(host: str, port: int) -> None:
    c = client("pong", host, port)

    def answer(msg: dict[str, Any]) -> dict[str, Any]:
        return {"N": msg["N"]}

    c.add_eventHandler(answer, CUSTOM, responseRooms="pong", trigger=Trigger(CUSTOM, "ping"))
    c.listen()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rlgym_peers")
    p.add_argument("role", choices=("model", "environment", "evolution", "echo"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--index", type=int, default=0, help="model: its number")
    p.add_argument("--models", type=int, default=6, help="evolution: how many models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch", action="store_true", help="model: torch actor-critic, trained")
    a = p.parse_args(argv)
    if a.role == "model":
        run_model(a.host, a.port, a.index, a.torch)
    elif a.role == "environment":
        run_environment(a.host, a.port, a.seed)
    elif a.role == "evolution":
        run_evolution(a.host, a.port, a.models, a.seed)
    else:
        run_echo(a.host, a.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
