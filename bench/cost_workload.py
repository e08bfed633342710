"""A fixed in-process workload, counted by valgrind: `python bench/cost_workload.py ...`.

Run as a script (not `-m`), so that `processor` and `transports` come from PYTHONPATH:
this checkout's, or an earlier one's (`bench --before`). It builds the worker on the
memory transport (`kind = "memory"`, a bus of its own, metrics server off), plays M models
and the environment in the same event loop, lockstep (the M messages of a window, then its
action), and counts instructions only where asked:

    warm-up windows, not counted (imports, first calls, caches)
    ZERO, DUMP "idle"       nothing between: the cost of the two requests themselves
    ZERO, N windows, DUMP "windows"
    ZERO, N windows through an echo in place of the worker (it reads the bus and answers
          every M-th message without decoding), DUMP "echo": the harness's own share

Under `valgrind --tool=callgrind --instr-atstart=no`, instrumentation starts at the first
request (imports and start-up run uninstrumented, several times faster); without valgrind
the requests do nothing. The requests are valgrind's client requests (valgrind.h): on
x86-64 Linux a fixed instruction sequence that valgrind recognises, written to an
executable page and called through ctypes; elsewhere `--requests` is refused and the
counts fall back to whole runs.

The message bytes are built before the first request; the seed, hash seed
(PYTHONHASHSEED=0, set by the caller) and workload are fixed, so a count repeats to
within a few instructions per window.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import mmap
import platform
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

# rol rdi,3; rol rdi,13; rol rdi,61; rol rdi,51 (the preamble: rdi is unchanged), then
# xchg rbx,rbx: the request, with rax = &args[0] and the default result in rdx.
_REQUEST = bytes.fromhex("4889f8" "31d2" "48c1c703" "48c1c70d" "48c1c73d" "48c1c733"
                         "4887db" "4889d0" "c3")
_CALLGRIND = (ord("C") << 24) | (ord("T") << 16)
DUMP_STATS_AT, ZERO_STATS, START_INSTRUMENTATION = _CALLGRIND + 3, _CALLGRIND + 1, \
    _CALLGRIND + 4
RUNNING_ON_VALGRIND = 0x1001


class Requests:
    """valgrind client requests from Python (x86-64 Linux)."""

    def __init__(self) -> None:
        if platform.machine() not in ("x86_64", "AMD64") or sys.platform != "linux":
            raise SystemExit("client requests are written for x86-64 Linux")
        self._page = mmap.mmap(-1, mmap.PAGESIZE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(_REQUEST)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self._call = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.POINTER(ctypes.c_ulong))(address)

    def __call__(self, request: int, arg: int = 0) -> int:
        args = (ctypes.c_ulong * 6)(request, arg, 0, 0, 0, 0)
        return int(self._call(args))

    def dump(self, name: str) -> None:
        label = ctypes.create_string_buffer(name.encode())  # read during the request
        self(DUMP_STATS_AT, ctypes.addressof(label))


def messages(models: int, actions: int, encoding: str, pool: int = 8) -> list[list[Any]]:
    """`[step][model]` payloads as the memory bus carries them: JSON bytes; for binary
    logits one packed body where the checkout reads it (`processor.messages.pack`), else
    (JSON header, float32 values), what the ZeroMQ transport hands over for three frames."""
    from processor import messages

    pack = getattr(messages, "pack", None)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(pool):
        x = rng.normal(0.0, 2.0, (models, actions)).astype(np.float32)
        row: list[Any] = []
        for m in range(models):
            obj = {"COMPONENT_ID": f"model-{m:02d}", "DETERMINISTIC": False}
            if encoding == "binary":
                parts = (orjson.dumps(obj), x[m].astype("<f4").tobytes())
                row.append(pack(*parts) if pack is not None else parts)
            else:
                row.append(orjson.dumps({**obj, "LOGITS": x[m].tolist()}))
        out.append(row)
    return out


async def drive(bus: Any, rows: list[list[Any]], windows: int, offset: int) -> None:
    """Lockstep: a window's messages on the bus, then wait for its action."""
    actions = bus.subscribe("action")
    try:
        for i in range(offset, offset + windows):
            for payload in rows[i % len(rows)]:
                bus.publish("logits", payload)
            await actions.get()
    finally:
        actions.close()


async def echo(bus: Any, models: int) -> None:
    """The harness's floor: drains the bus as the memory transport does, answers every
    M-th logits message, reads none. Runs until cancelled."""
    sub = bus.subscribe("logits")
    count = 0
    try:
        while True:
            batch = [await sub.get(), *sub.drain()]
            for _ in batch:
                count += 1
                if count == models:
                    count = 0
                    bus.publish("action", b'{"ACTION":[0]}')
    finally:
        sub.close()


async def session(args: argparse.Namespace, mark: Callable[[str], None],
                  zero: Callable[[], None]) -> None:
    from processor.config import from_mapping
    from processor.worker import Worker
    from transports.memory import MemoryBus, MemoryTransport

    rows = messages(args.models, args.actions, args.encoding)
    cfg = from_mapping({"transport": {"kind": "memory"}, "metrics": {"port": 0},
                        "window": {"models": args.models, "key": [], "timeout_ms": 0},
                        "aggregate": {"seed": 0}})
    bus = MemoryBus()
    worker = Worker(cfg, MemoryTransport(cfg, lambda reason, detail: None, bus=bus))
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(worker.run(stop, started))
    await started.wait()
    await drive(bus, rows, args.warmup, 0)
    zero()
    mark("idle")
    zero()
    await drive(bus, rows, args.windows, args.warmup)
    mark("windows")
    stop.set()
    await task
    floor = asyncio.create_task(echo(bus, args.models))
    await asyncio.sleep(0)
    await drive(bus, rows, args.warmup, 0)
    zero()
    await drive(bus, rows, args.windows, args.warmup)
    mark("echo")
    floor.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/cost_workload.py")
    p.add_argument("--models", type=int, default=20)
    p.add_argument("--actions", type=int, default=18)
    p.add_argument("--encoding", choices=("json", "binary"), default="json")
    p.add_argument("--windows", type=int, default=200)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--requests", action="store_true",
                   help="issue valgrind client requests (run under callgrind)")
    args = p.parse_args(argv)
    requests = Requests() if args.requests else None
    started = False

    def zero() -> None:
        nonlocal started
        if requests is not None:
            if not started:
                requests(START_INSTRUMENTATION)
                started = True
            requests(ZERO_STATS)

    def mark(name: str) -> None:
        if requests is not None:
            requests.dump(name)

    gc.collect()
    asyncio.run(session(args, mark, zero))
    return 0


if __name__ == "__main__":
    sys.exit(main())
