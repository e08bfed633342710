"""What the example's processes share: topics, message fields and the run's config file.

Topics besides the worker's own (`logits`, `action`, `evolution`):

- `observation`: environment -> models. `{"HELLO": n}` during the handshake;
  `{"ENV_ID", "STEP", "OBSERVATION": B rows of 4, "REWARD": B, "DONE": B, "ACTION": B,
  "FINAL": {row: 4 values}, "DETERMINISTIC"}` each step (REWARD, DONE and ACTION belong to
  the previous step; FINAL holds the last observation of an episode cut by the time limit,
  for bootstrapping); `{"STOP": true}` at the end.
- `control`: models -> environment. `{"HELLO": n, "MODEL": id}` answers the handshake;
  `{"LOADED": round, "MODEL": id, "SOURCE": id}` once copied weights are in place.
- `weights`: evolution -> models, and model -> model. `{"CMD": "COPY", "SOURCE",
  "TARGET", "ROUND", "NOISE"}` asks model SOURCE to send its policy's weights to model
  TARGET (not FROM and TO: a swergio server also sends a message with a TO to the client
  of that NAME, so the target would get it twice);
  `{"WEIGHTS": {name: values}, "SOURCE", "TARGET", "ROUND", "NOISE"}` carries them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

OBSERVATION = "observation"
CONTROL = "control"
WEIGHTS = "weights"

ENV_ID = "cartpole"
STEP_KEY = ["ENV_ID", "STEP"]
TRANSPORTS = ("zmq", "nats", "swergio")
ALGOS = ("a2c", "ppo")
EVOLVE = ("copy", "weights", "both")

ROOT = Path(__file__).resolve().parents[2]


def model_ids(models: int) -> list[str]:
    return [f"model-{i}" for i in range(models)]


def toml_text(data: Mapping[str, Any], prefix: str = "") -> str:
    """A nested mapping of strings, numbers, booleans and lists as TOML.

    JSON's spelling of these values is also TOML's, so `json.dumps` writes each one."""
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, Mapping)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, Mapping)]
    out = [f"[{prefix}]\n"] if prefix and scalars else []
    out += [f"{k} = {json.dumps(v)}\n" for k, v in scalars]
    for k, v in tables:
        out.append(toml_text(v, f"{prefix}.{k}" if prefix else k))
    return "".join(out)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a process the example starts.

    Without SWARM_AGG__* variables: the run's config file says everything, so the worker
    and the peers read the same settings whatever the user's shell holds. One thread per
    torch (and OpenMP) in every process: on 2 cores, torch's default of a thread per core
    in each of M model processes makes small networks several times slower.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_AGG__")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
