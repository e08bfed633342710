"""The models' logits messages, encoded before any timing starts.

The logits are float32 draws printed as a model's `tensor.tolist()` prints them (float32
values in float64 notation, about 19 characters each), so the messages have the sizes a
real swarm sends. A small pool of steps is cycled so that consecutive windows differ.
Every message says `DETERMINISTIC: false`: the action is sampled, as in training.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

POOL = 8  # distinct steps cycled by the drivers
ENV_ID = "bench"


def model_id(m: int) -> str:
    return f"model-{m:02d}"


def logits_matrix(models: int, actions: int, seed: int) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    values: list[list[float]] = rng.normal(0.0, 2.0, (models, actions)).astype(
        np.float32).tolist()
    return values


def logits_object(m: int, logits: list[float], **extra: Any) -> dict[str, Any]:
    return {**extra, "COMPONENT_ID": model_id(m), "DETERMINISTIC": False, "LOGITS": logits}


def lockstep_bodies(models: int, actions: int, pool: int = POOL, **extra: Any
                    ) -> list[list[bytes]]:
    """`[step][model]` JSON bodies of lockstep windows (no step key)."""
    out = []
    for step in range(pool):
        x = logits_matrix(models, actions, seed=step)
        out.append([orjson.dumps(logits_object(m, x[m], **extra)) for m in range(models)])
    return out


def keyed_prefixes(models: int, actions: int, env_id: str, pool: int = POOL
                   ) -> list[list[bytes]]:
    """`[step][model]` bodies of keyed windows, cut before the STEP value.

    `keyed_body(prefix, step)` completes one: a bytes concatenation, not a JSON encoding.
    """
    out = []
    for step in range(pool):
        x = logits_matrix(models, actions, seed=step)
        row = []
        for m in range(models):
            body = orjson.dumps(logits_object(m, x[m], ENV_ID=env_id))
            row.append(body[:-1] + b',"STEP":')
        out.append(row)
    return out


def keyed_body(prefix: bytes, step: int) -> bytes:
    return prefix + b"%d}" % step


def keyed_binary_prefixes(models: int, actions: int, env_id: str, pool: int = POOL
                          ) -> list[list[tuple[bytes, bytes]]]:
    """`[step][model]` binary logits messages of keyed windows: (JSON without LOGITS, cut
    before the STEP value, float32 values), the two frames after the topic.

    `keyed_body(prefix, step)` completes the JSON frame, as for `keyed_prefixes`.
    """
    out = []
    for step in range(pool):
        x = logits_matrix(models, actions, seed=step)
        row = []
        for m in range(models):
            meta = orjson.dumps({"ENV_ID": env_id, "COMPONENT_ID": model_id(m),
                                 "DETERMINISTIC": False})
            row.append((meta[:-1] + b',"STEP":', np.asarray(x[m], dtype="<f4").tobytes()))
        out.append(row)
    return out


def lockstep_binary(models: int, actions: int, pool: int = POOL) -> list[list[tuple[bytes,
                                                                                   bytes]]]:
    """`[step][model]` binary logits messages of lockstep windows (no step key)."""
    out = []
    for step in range(pool):
        x = logits_matrix(models, actions, seed=step)
        out.append([(orjson.dumps({"COMPONENT_ID": model_id(m), "DETERMINISTIC": False}),
                     np.asarray(x[m], dtype="<f4").tobytes()) for m in range(models)])
    return out
