"""Cost per window and memory while a peer invents COMPONENT_IDs without end.

    python -m bench.ids_bench [--ids 200000] [--every 20000]

The real Worker in this process on the memory transport (no sockets: only the worker's
own cost is timed). Windows of two models: one regular model that takes part in every
window, and one new id each time. Prints, every `--every` ids, the CPU time per window of
the last chunk and the process's resident memory; the first and last rows are the ones
to compare (the cost must not grow with the ids seen, and memory must level off).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
import orjson
from prometheus_client import CollectorRegistry

from processor.config import from_mapping
from processor.metrics import Metrics
from processor.worker import Worker
from transports.memory import MemoryBus, MemoryTransport


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def run(ids: int, every: int) -> list[tuple[int, float, float]]:
    cfg = from_mapping({"transport": {"kind": "memory"},
                        "window": {"models": 2, "key": ["STEP"], "timeout_ms": 0},
                        "metrics": {"port": 0}})
    bus = MemoryBus()
    transport = MemoryTransport(cfg, lambda r, d: None, bus=bus)
    worker = Worker(cfg, transport, Metrics(CollectorRegistry()))
    out = bus.subscribe("action")
    rng = np.random.default_rng(0)
    rows: list[tuple[int, float, float]] = []
    async with transport:
        step = 0
        while step < ids:
            chunk = []
            for i in range(step, step + every):
                x = rng.normal(0, 1, (2, 6)).round(3).tolist()
                chunk.append(orjson.dumps({"LOGITS": x[0], "COMPONENT_ID": "regular",
                                           "STEP": i, "DETERMINISTIC": True}))
                chunk.append(orjson.dumps({"LOGITS": x[1], "COMPONENT_ID": f"id{i}",
                                           "STEP": i, "DETERMINISTIC": True}))
            now = time.monotonic()
            batch = [("logits", body, now, None) for body in chunk]
            t0 = time.process_time()
            for s in range(0, len(batch), 64):   # bursts as a busy transport hands them over
                await worker.handle(batch[s:s + 64])
            cpu = time.process_time() - t0
            out.drain(len(batch))
            step += every
            rows.append((step, cpu / every * 1e6, rss_mib()))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ids", type=int, default=200_000)
    p.add_argument("--every", type=int, default=20_000)
    a = p.parse_args()
    print(f"{'ids seen':>9}  {'CPU µs/window':>13}  {'RSS MiB':>8}")
    for seen, us, rss in asyncio.run(run(a.ids, a.every)):
        print(f"{seen:>9}  {us:>13.1f}  {rss:>8.1f}")


if __name__ == "__main__":
    main()
