"""In-process sections: `kernel` (aggregation and decoding alone) and the metrics calls.

- Aggregation: `processor.aggregate.SumProbs` on M = 20 models' float32 logits of shape
  (1, A) per window, sampling (DETERMINISTIC false), one window per call (what a worker
  does in lockstep) against W windows per call (what it does with a burst of keyed
  windows); reported per window.
- Decoding: `decode_object` + `parse_logits` of one logits message as a model sends it,
  next to `orjson.loads` alone; per message.
- Instrumentation: the `Metrics` calls the worker makes for one lockstep window (M
  `receive`, `closed`, the aggregation histogram, `published`, `credit` of M models, two
  gauges), on a fresh registry; per window. These run whether or not the metrics server
  does (SWARM_AGG__METRICS__PORT=0 removes only the server).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import orjson

from . import payloads
from .common import Plan, stat


def seconds_per_call(fn: Callable[[], Any], min_s: float) -> float:
    """Mean seconds of one call, over a loop that lasts at least `min_s`."""
    fn()  # warm caches, lazy imports, allocator
    n = 1
    while True:
        gc.disable()
        try:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            elapsed = time.perf_counter() - t0
        finally:
            gc.enable()
        if elapsed >= min_s:
            return elapsed / n
        n = max(n * 2, int(n * min_s / max(elapsed, 1e-9) * 1.2))


def timed(fn: Callable[[], Any], plan: Plan, per: int = 1) -> dict[str, Any]:
    """µs per item (`per` items per call), median and spread over the repeats."""
    return stat([seconds_per_call(fn, plan.timing_s) / per * 1e6
                 for _ in range(plan.kernel_repeats)])


def kernel_section(plan: Plan) -> dict[str, Any]:
    from processor.aggregate import SumProbs, use_one_thread
    from processor.config import LimitsConfig
    from processor.messages import decode_logits, decode_object, encode_packed, parse_logits

    use_one_thread()  # as a running worker does
    strategy = SumProbs(seed=0)
    rng = np.random.default_rng(0)
    widest = max(plan.kernel_batches, default=1)
    rows = []
    for a in plan.kernel_actions:
        stacks = [rng.normal(0.0, 2.0, (plan.models, 1, a)).astype(np.float32)
                  for _ in range(widest)]
        row: dict[str, Any] = {"actions": a, "models": plan.models,
                               "single_us_per_window": timed(
                                   partial(strategy, stacks[:1], [False]), plan)}
        for w in plan.kernel_batches:
            row[f"batch_{w}_us_per_window"] = timed(
                partial(strategy, stacks[:w], [False] * w), plan, per=w)
        rows.append(row)

    limits = LimitsConfig()

    def decode_one(body: bytes) -> Any:
        obj = decode_object(body, limits.max_message_bytes)
        return parse_logits(obj, (), limits.max_actions, limits.max_batch)

    def decode_binary_one(body: bytes) -> Any:  # one packed body, as the client sends it
        return decode_logits(body, (), limits.max_message_bytes, limits.max_actions,
                             limits.max_batch)

    decode = []
    for a in plan.decode_actions:
        body = payloads.lockstep_bodies(plan.models, a, pool=1)[0][0]
        obj = orjson.loads(body)
        packed = encode_packed(obj, obj["LOGITS"])
        decode.append({"actions": a, "message_bytes": len(body),
                       "decode_us": timed(partial(decode_one, body), plan),
                       "orjson_loads_us": timed(partial(orjson.loads, body), plan),
                       "binary_bytes": len(packed),
                       "binary_decode_us": timed(partial(decode_binary_one, packed), plan)})
    return {"config": {"strategy": "sum_probs", "deterministic": False, "batch_B": 1,
                       "repeats": plan.kernel_repeats,
                       "timing_s": plan.timing_s, "torch_threads": _torch_threads()},
            "aggregate": rows, "decode": decode}


def instrumentation_us_per_window(plan: Plan) -> dict[str, Any]:
    from processor.metrics import Metrics

    metrics = Metrics(max_models=max(100, plan.models))
    models = [payloads.model_id(m) for m in range(plan.models)]
    credits = [1.0 / plan.models] * plan.models

    def one_window() -> None:
        for _ in models:
            metrics.receive("logits")
        metrics.closed("complete")
        metrics.aggregation.observe(5e-5)
        metrics.published(2e-4, 1e-4, 1)
        metrics.credit(models, credits)
        metrics.open_windows.set(0)
        metrics.ready.set(1)

    return timed(one_window, plan)


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())
