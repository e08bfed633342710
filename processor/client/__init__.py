"""The peers' library: models, environments and evolution components over every transport.

Guarantees
- It connects where the worker listens, from the worker's own Config (`transport.kind`,
  addresses, `[topics]`, `window.key`): the same file and SWARM_AGG__* variables serve both.
- Nothing that arrives before it is waited for is lost: actions wait by step key, replies
  by REQUEST_ID, each subscribed topic in order, up to `buffer` entries (then the oldest
  goes, counted in `swarm.inbox.dropped`).
- Every evolution request carries a REQUEST_ID and is sent again with the same id until
  answered (the worker answers a repeated GET with the same report, without a second
  reset); on NATS, until every partition's worker has answered, and the shares are merged.
- ZeroMQ: `ready()` sends PEEK until the worker answers, so nothing is lost to the slow
  joiner after it; binary float32 logits, packed in one frame, on request. swergio:
  REGISTER and JOINROOM as the worker does, each frame in one write with TCP_NODELAY,
  TCP_QUICKACK on reads, rooms joined before they are written to. NATS: logits by
  JetStream publish, sent again without a PubAck under the same `Nats-Msg-Id` (model and
  step key), so never stored twice; binary float32 logits, packed, on request.
- Delivery is otherwise the transport's (README, "Guarantees per transport").

    from processor.client import connect

    with connect("worker.toml") as swarm:         # or connect(cfg), connect() for defaults
        model, env = swarm.model("m1"), swarm.environment()
        swarm.ready()                              # the worker answers: all paths are up
        model.send([0.1, 2.0, 0.3], {"ENV_ID": "e1", "STEP": 0})
        action = env.wait({"ENV_ID": "e1", "STEP": 0})     # {"ACTION": [1], ...}
        report = swarm.evolution().get()                    # {"CONTRIBUTION": {...}, ...}

The async twin: `async with connect_async(cfg) as swarm:`, the same names with `await`
(`await swarm.environment()`, `await env.wait(key)`, ...). The sync Swarm is for one thread
at a time; on swergio and NATS it runs the async one on a loop thread of its own.
"""

from __future__ import annotations

from ._async import (
    AsyncEnvironment,
    AsyncEvolution,
    AsyncModel,
    AsyncSubscription,
    AsyncSwarm,
    connect_async,
)
from ._core import ClientError, NoReply
from ._sync import Environment, Evolution, Model, Subscription, Swarm, connect

__all__ = [
    "AsyncEnvironment",
    "AsyncEvolution",
    "AsyncModel",
    "AsyncSubscription",
    "AsyncSwarm",
    "ClientError",
    "Environment",
    "Evolution",
    "Model",
    "NoReply",
    "Subscription",
    "Swarm",
    "connect",
    "connect_async",
]
