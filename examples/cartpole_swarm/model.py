"""One model of the swarm: a Stable-Baselines3 policy in a process of its own.

`python -m examples.cartpole_swarm.model -c RUN.toml --id model-0 [--envs B] ...`; the
launcher (`python -m examples.cartpole_swarm`) starts M of these.

Each observation (B rows) goes through the policy's own networks (features, MLP
extractor, `action_net` for the logits, `value_net` for the value), and the logits go to
the worker at once, under the observation's step key. Then the model books the previous
step's transition in SB3's own RolloutBuffer, with the action the *swarm* took and the
reward it got (as the swergio RLGym example's models do), and every `--train-every` steps
(a full buffer: A2C's n_steps, 5 as in the example) runs SB3's own update, `A2C.train()` or
`PPO.train()`. The update runs after the logits are out, so the swarm does not wait for
it; the price is that the value of the one observation that starts each rollout comes from
the policy before that update instead of after it. An episode cut by the time limit is
bootstrapped with the value of its last observation, as SB3 does.

On `weights`: asked to (`CMD: COPY` naming it SOURCE), it sends its policy's weights to
the model TARGET; named TARGET, it loads the weights it is sent (plus Gaussian noise of
std NOISE: a mutation), drops the transitions it gathered with its old weights, and says
LOADED on `control`, once per round whatever reaches it twice.

On ZeroMQ it uses the client library's sync Swarm (blocking sockets, read in this thread);
on swergio and NATS the async one (their connections live on an asyncio loop, which the
sync Swarm would run in a thread of its own, with a hand-over for every message).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .common import ALGOS, CONTROL, OBSERVATION, WEIGHTS

OBS_DIM = 4   # CartPole: cart position and speed, pole angle and angular speed


def make_algorithm(algo: str, envs: int, train_every: int, seed: int) -> Any:
    """An SB3 A2C or PPO on CartPole-v1's spaces with the RLGym example's network (two
    16-unit layers for the policy, two for the value) and a rollout of `train_every` steps
    over B environments. Its environments only lend their spaces: the swarm's environment
    process steps the real ones."""
    import gymnasium as gym
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.vec_env import DummyVecEnv

    spaces = DummyVecEnv([lambda: gym.make("CartPole-v1")] * envs)
    common: dict[str, Any] = {
        "n_steps": train_every, "device": "cpu", "seed": seed, "verbose": 0,
        "policy_kwargs": {"net_arch": {"pi": [16, 16], "vf": [16, 16]}}}
    model: A2C | PPO
    if algo == "ppo":
        # One minibatch of the whole rollout: PPO's default of 64 exceeds 5 x B.
        model = PPO("MlpPolicy", spaces, batch_size=train_every * envs, **common)
    else:
        model = A2C("MlpPolicy", spaces, **common)
    model.set_logger(Logger(None, []))  # train() records its losses; nobody reads them here
    return model


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return out


class Learner:
    """The policy and its rollout: `act` gives the logits of an observation, `book` files
    the transition that the next observation completes and trains when the buffer is full."""

    def __init__(self, algorithm: Any, envs: int, seed: int) -> None:
        self.algo = algorithm
        self.policy = algorithm.policy
        self.buffer = algorithm.rollout_buffer
        self.gamma = float(algorithm.gamma)
        self.envs = envs
        self.rng = np.random.default_rng(seed)
        self.policy.set_training_mode(False)
        # What the previous observation gave: (obs, values, logits, episode starts).
        self.prev: tuple[np.ndarray, Any, np.ndarray, np.ndarray] | None = None
        self.updates = 0

    def _latent(self, obs: np.ndarray) -> tuple[Any, Any]:
        features = self.policy.extract_features(torch.as_tensor(obs))
        return self.policy.mlp_extractor(features)  # type: ignore[no-any-return]

    def act(self, obs: np.ndarray) -> tuple[np.ndarray, Any]:
        """Logits (B, 2) and values (B,) of B observations, by the policy's own layers."""
        with torch.no_grad():
            latent_pi, latent_vf = self._latent(obs)
            logits = self.policy.action_net(latent_pi)
            values = self.policy.value_net(latent_vf).flatten()
        return logits.numpy(), values

    def value(self, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            values: np.ndarray = self.policy.predict_values(torch.as_tensor(obs)).numpy()
        return values.ravel()

    def book(self, msg: dict[str, Any], obs: np.ndarray, values: Any, logits: np.ndarray
             ) -> bool:
        """File the previous step's transition (its action, reward and end are in `msg`,
        with the observation that followed); train when the rollout is full. True when it
        trained."""
        trained = False
        starts = np.asarray(msg.get("DONE", [True] * self.envs), dtype=np.float32)
        if self.prev is not None and "ACTION" in msg:
            p_obs, p_values, p_logits, p_starts = self.prev
            actions = np.asarray(msg["ACTION"], dtype=np.int64).reshape(self.envs)
            rewards = np.asarray(msg["REWARD"], dtype=np.float32).reshape(self.envs).copy()
            for row, final in (msg.get("FINAL") or {}).items():
                # Cut by the time limit, not failed: the episode's value goes on.
                rewards[int(row)] += self.gamma * float(
                    self.value(np.asarray([final], dtype=np.float32))[0])
            log_probs = log_softmax(p_logits)[np.arange(self.envs), actions]
            self.buffer.add(p_obs, actions.reshape(self.envs, 1), rewards, p_starts, p_values,
                            torch.as_tensor(log_probs))
            if self.buffer.full:
                self.buffer.compute_returns_and_advantage(last_values=values, dones=starts)
                self.algo.train()
                self.policy.set_training_mode(False)
                self.buffer.reset()
                self.updates += 1
                trained = True
        self.prev = (obs, values, logits, starts)
        return trained

    def weights(self) -> dict[str, list[float]]:
        return {k: v.detach().cpu().numpy().ravel().tolist()
                for k, v in self.policy.state_dict().items()}

    def load(self, weights: dict[str, list[float]], noise: float) -> None:
        """Another model's weights, plus Gaussian noise of std `noise`; the transitions
        gathered with the old weights, and the step in flight, are dropped (the update is
        on-policy)."""
        state = self.policy.state_dict()
        missing = set(state) - set(weights)
        if missing:
            raise ValueError(f"weights without {sorted(missing)}")
        new = {}
        for name, old in state.items():
            values = np.asarray(weights[name], dtype=np.float32).reshape(tuple(old.shape))
            if noise > 0 and old.is_floating_point():
                mutation = self.rng.normal(0.0, noise, values.shape)
                values = values + np.asarray(mutation, dtype=np.float32)
            new[name] = torch.as_tensor(values, dtype=old.dtype)
        self.policy.load_state_dict(new)
        self.buffer.reset()
        self.prev = None


Outgoing = tuple[str, Any]  # (topic, body) to publish, or (LOGITS, (logits, key, det))
LOGITS = "logits"
STOP = ("stop", None)


class Peer:
    """What the model does with each message, whichever client carries them: the sync
    loop (`serve`) or the async one (`serve_async`) sends what it returns."""

    def __init__(self, model_id: str, learner: Learner, envs: int) -> None:
        self.id = model_id
        self.learner = learner
        self.envs = envs
        self.pending: tuple[dict[str, Any], np.ndarray, Any, np.ndarray] | None = None
        self.done: dict[str, Any] = {"MODEL": model_id, "STEPS": 0, "UPDATES": 0,
                                     "SENT_WEIGHTS": 0, "LOADED": 0, "ROUNDS": []}

    def observation(self, msg: Any) -> Outgoing | None:
        """The answer to a message on `observation`: logits, a HELLO back, or STOP."""
        if not isinstance(msg, dict):
            return None
        if msg.get("STOP"):
            return STOP
        if "HELLO" in msg:
            return CONTROL, {"HELLO": msg["HELLO"], "MODEL": self.id}
        obs = np.asarray(msg["OBSERVATION"], dtype=np.float32).reshape(self.envs, OBS_DIM)
        logits, values = self.learner.act(obs)
        self.pending = (msg, obs, values, logits)
        return LOGITS, (logits[0] if self.envs == 1 else logits, msg,
                        bool(msg.get("DETERMINISTIC", False)))

    def sent(self) -> None:
        """The logits are out: book the step (and train when the rollout is full)."""
        if self.pending is not None:
            self.learner.book(*self.pending)
            self.pending = None
            self.done["STEPS"] += 1
            self.done["UPDATES"] = self.learner.updates

    def weights(self, msg: Any) -> Outgoing | None:
        """Asked for its weights: them; sent weights: loaded, and LOADED back."""
        if not isinstance(msg, dict):
            return None
        if msg.get("CMD") == "COPY" and msg.get("SOURCE") == self.id:
            self.done["SENT_WEIGHTS"] += 1
            return WEIGHTS, {"WEIGHTS": self.learner.weights(), "SOURCE": self.id,
                             "TARGET": msg.get("TARGET"), "ROUND": msg.get("ROUND"),
                             "NOISE": msg.get("NOISE", 0.0)}
        if "WEIGHTS" in msg and msg.get("TARGET") == self.id \
                and msg.get("ROUND") not in self.done["ROUNDS"]:
            self.done["ROUNDS"].append(msg.get("ROUND"))
            self.learner.load(msg["WEIGHTS"], float(msg.get("NOISE") or 0.0))
            self.done["LOADED"] += 1
            return CONTROL, {"LOADED": msg.get("ROUND"), "MODEL": self.id,
                             "SOURCE": msg.get("SOURCE")}
        return None


def serve(config: str, peer: Peer) -> None:
    """The sync client (ZeroMQ: blocking sockets read in this thread, nothing in between)."""
    from processor.client import connect

    with connect(config, name=peer.id) as swarm:
        observations = swarm.subscribe(OBSERVATION)
        weights = swarm.subscribe(WEIGHTS)
        model = swarm.model(peer.id)
        swarm.ready(timeout=60.0)  # the worker answers: logits sent from now on reach it
        while True:
            swarm.pump(1.0)
            for msg in weights.drain():
                if (out := peer.weights(msg)) is not None:
                    swarm.publish(*out)
            for msg in observations.drain():
                out = peer.observation(msg)
                if out is STOP:
                    swarm.publish(CONTROL, {"BYE": peer.id, **peer.done})
                    return
                if out is None:
                    continue
                if out[0] == LOGITS:
                    logits, key, det = out[1]
                    model.send(logits, key, deterministic=det)
                    peer.sent()
                else:
                    swarm.publish(*out)


async def serve_async(config: str, peer: Peer) -> None:
    """The async client (swergio and NATS: their connections are asyncio's, and the sync
    client would hand every call to a loop thread and back).

    A task takes `weights` messages while the main loop takes observations, so a copy is
    loaded while the environment waits for it, between two steps; an update (a few
    milliseconds of torch) holds the loop, and what arrives meanwhile waits in the socket."""
    from processor.client import connect_async

    async with connect_async(config, name=peer.id) as swarm:
        observations = await swarm.subscribe(OBSERVATION)
        weights = await swarm.subscribe(WEIGHTS)
        model = swarm.model(peer.id)
        await swarm.ready(timeout=60.0)

        async def take_weights() -> None:
            async for msg in weights:
                if (out := peer.weights(msg)) is not None:
                    await swarm.publish(*out)

        weights_task = asyncio.create_task(take_weights())
        try:
            async for msg in observations:
                out = peer.observation(msg)
                if out is STOP:
                    break
                if out is None:
                    continue
                if out[0] == LOGITS:
                    logits, key, det = out[1]
                    await model.send(logits, key, deterministic=det)
                    peer.sent()
                else:
                    await swarm.publish(*out)
        finally:
            weights_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await weights_task
        await swarm.publish(CONTROL, {"BYE": peer.id, **peer.done})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.cartpole_swarm.model",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", required=True, help="the run's config (the worker's)")
    p.add_argument("--id", required=True, help="COMPONENT_ID")
    p.add_argument("--envs", type=int, default=1, help="B, environments per step")
    p.add_argument("--train-every", type=int, default=5, help="rollout length (steps)")
    p.add_argument("--algo", choices=ALGOS, default="a2c")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # M processes share the cores: one thread each

    from processor.config import load

    learner = Learner(make_algorithm(args.algo, args.envs, args.train_every, args.seed),
                      args.envs, args.seed)
    peer = Peer(args.id, learner, args.envs)
    if load(args.config).transport.kind == "zmq":
        serve(args.config, peer)
    else:
        asyncio.run(serve_async(args.config, peer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
