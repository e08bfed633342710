"""The swergio RLGym example's aggregation component, the baseline of `swergio_lockstep`.

Re-implemented from its description (shared/seeds/000_73983450448c047f.txt): a real
`swergio.Client` named `aggregation`; the handler `aggregate` keeps each model's LOGITS by
COMPONENT_ID until NR_OF_MODELS have sent, then `get_action` (torch: softmax of each, sum,
Categorical, argmax or sample, contribution p_m[a] / P[a]) and an ACTION to the room
`action`; `send_contribution` answers a GET in the room `evolution` with the contribution
so far and clears it; `client.listen()`. Same math, same socket use, same libraries.
Only the server address (an argument, not the host's name) and the model count differ.

    python -m bench.seed_aggregator --port PORT [--host 127.0.0.1] [--models 20]
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from swergio import MESSAGE_TYPE, Client, Trigger
from torch.distributions import Categorical
from torch.distributions.utils import logits_to_probs

COMPONENT_NAME = "aggregation"
FORMAT = "utf-8"
HEADER_LENGTH = 10


def get_action(dict_actions_logits: dict[Any, list[float]], deterministic: bool = False
               ) -> tuple[np.ndarray, dict[Any, Any]]:
    all_probs = torch.stack([logits_to_probs(torch.tensor(v).unsqueeze(0))
                             for v in dict_actions_logits.values()])
    probs = all_probs.sum(0)
    dist = Categorical(probs=probs)
    if deterministic:
        chosen = torch.argmax(dist.probs, dim=1)
    else:
        chosen = dist.sample()
    action = chosen.numpy()
    ai = action[0]
    ai_cont = (all_probs[:, :, ai].squeeze() / probs[:, ai]).numpy()
    contribution = {k: ai_cont[i] for i, k in enumerate(dict_actions_logits.keys())}
    return action, contribution


def build(host: str, port: int, models: int) -> Client:
    memory: dict[Any, list[float]] = {}
    contribution_memory: dict[Any, float] = {}
    client = Client(COMPONENT_NAME, host, port, FORMAT, HEADER_LENGTH, memory=memory,
                    contribution_memory=contribution_memory)

    # swergio passes the client's keyword arguments by parameter name: keep these names.
    def aggregate(msg: dict[str, Any], memory: dict[Any, list[float]],
                  contribution_memory: dict[Any, float]) -> dict[str, Any] | None:
        if "LOGITS" in msg and "COMPONENT_ID" in msg:
            memory[msg["COMPONENT_ID"]] = msg["LOGITS"]
        if len(memory) == models:
            action, contribution = get_action(memory, deterministic=msg["DETERMINISTIC"])
            for k, v in contribution.items():
                if k in contribution_memory:
                    contribution_memory[k] += float(v)
                else:
                    contribution_memory[k] = float(v)
            memory.clear()
            return {"ACTION": action.tolist()}
        return None

    def send_contribution(msg: dict[str, Any], contribution_memory: dict[Any, float]
                          ) -> dict[str, Any] | None:
        if "CMD" in msg and msg["CMD"] == "GET":
            contribution = copy.deepcopy(contribution_memory)
            contribution_memory.clear()
            print(contribution)
            return {"CONTRIBUTION": contribution}
        return None

    client.add_eventHandler(aggregate, MESSAGE_TYPE.DATA.CUSTOM, responseRooms="action",
                            trigger=Trigger(MESSAGE_TYPE.DATA.CUSTOM, "logits"))
    client.add_eventHandler(send_contribution, MESSAGE_TYPE.DATA.CUSTOM,
                            responseRooms="evolution",
                            trigger=Trigger(MESSAGE_TYPE.DATA.CUSTOM, "evolution"))
    return client


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.seed_aggregator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--models", type=int, default=20)
    args = p.parse_args(argv)
    build(args.host, args.port, args.models).listen()
    return 0


if __name__ == "__main__":
    sys.exit(main())
