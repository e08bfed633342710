"""`cost`: the worker's cost per window in units that hold still when the machine is busy.

- instructions per window, counted by valgrind (callgrind) over a fixed in-process workload
  through the memory transport (`bench/cost_workload.py`: lockstep windows of M models,
  JSON or binary logits). Only the windows are counted (valgrind client requests around
  them); the count of the same requests with nothing between is subtracted, and the
  harness's own share (the models and environment in the same process, an echo in place
  of the worker) is reported beside it: `worker` = windows - echo. The same workload
  gives the same count to about 0.1 %, whatever else the machine runs.
- CPU time per window, from /proc (user + system, all threads), of the worker process on
  ZeroMQ over a fixed number of keyed windows, K in flight (as `zmq_pipelined`). CPU time
  does not count the time spent waiting for a core, but it does count what a busy machine
  makes slower (caches, wake-ups), so it moves a little with the load.

Both for JSON and binary logits at A = 18 and 1000 (M = 20), and JSON at A = 18 with
M = 8 (for the scale table, `bench.scale`). With `--before DIR`, the earlier checkout's
worker is counted beside this one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import orjson
import zmq

from .common import ROOT, BenchError, Plan, cpu_seconds, stat
from .zmq_bench import Peer, peer
from .zmq_wire import BINARY, JSON, _window_sender, keyed_frames, packs

WORKLOAD = ROOT / "bench" / "cost_workload.py"


def cases(plan: Plan) -> list[tuple[int, int, str]]:
    """(M, A, encoding) of every cost figure."""
    out = [(plan.models, a, e) for a in plan.cost_actions for e in (JSON, BINARY)]
    return out + [(m, 18, JSON) for m in plan.cost_extra_models if m != plan.models]


# -- instructions --------------------------------------------------------------------------


def _summary(path: Path) -> int:
    m = re.search(r"^summary: (\d+)$", path.read_text(errors="replace"), re.M)
    if m is None:
        raise BenchError(f"no summary in {path}")
    return int(m.group(1))


def instructions(root: Path, models: int, actions: int, encoding: str, windows: int,
                 warmup: int) -> dict[str, Any]:
    """Instructions per window (callgrind) of the worker of `root`, and of the harness."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise BenchError("valgrind not found (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp:
        out = Path(tmp) / "cg.out"
        env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(root)}
        argv = [valgrind, "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={out}", sys.executable, str(WORKLOAD),
                "--models", str(models), "--actions", str(actions), "--encoding", encoding,
                "--windows", str(windows), "--warmup", str(warmup), "--requests"]
        t0 = time.monotonic()
        proc = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=1800, check=False)
        if proc.returncode != 0:
            raise BenchError(f"callgrind workload failed ({proc.returncode}):\n"
                             f"{proc.stderr[-2000:]}")
        dumps = {}
        for part in sorted(Path(tmp).glob("cg.out.*")):
            text = part.read_text(errors="replace")
            m = re.search(r"^desc: Trigger: Client Request: (\w+)$", text, re.M)
            if m:
                dumps[m.group(1)] = _summary(part)
        if set(dumps) != {"idle", "windows", "echo"}:
            raise BenchError(f"callgrind dumps {sorted(dumps)}; stderr:\n{proc.stderr[-2000:]}")
    per = {k: (dumps[k] - dumps["idle"]) / windows for k in ("windows", "echo")}
    return {"windows": windows, "per_window": per["windows"], "harness": per["echo"],
            "worker": per["windows"] - per["echo"], "idle": dumps["idle"],
            "seconds": round(time.monotonic() - t0, 1)}


# -- CPU time ------------------------------------------------------------------------------


def cpu_per_window(p: Peer, rows: list[list[tuple[bytes, tuple[bytes, ...]]]],
                   inflight: int, windows: int, packed: bool) -> float:
    """The peer's CPU seconds per window over exactly `windows` keyed windows (binary
    logits packed in one body, or in three frames)."""
    recv = p.link.sub.recv_multipart
    window = _window_sender(p.link.pub.send_multipart, rows, packed)
    before = cpu_seconds(p.child.pid)
    sent = received = 0
    gc.disable()
    try:
        while sent < min(inflight, windows):
            window(sent)
            sent += 1
        while received < windows:
            try:
                topic, body = recv()
            except zmq.Again:
                p.child.check()
                raise BenchError(f"{p.child.name}: {windows - received} actions missing") \
                    from None
            if topic != b"action":
                continue
            orjson.loads(body)
            received += 1
            if sent < windows:
                window(sent)
                sent += 1
    finally:
        gc.enable()
    after = cpu_seconds(p.child.pid)
    if before is None or after is None:
        raise BenchError("no /proc: CPU time cannot be read")
    return (after - before) / windows


def cpu_times(plan: Plan, kinds: tuple[str, ...]) -> dict[tuple[int, int, str], Any]:
    """CPU µs per window of each worker in `kinds`, per case, median and spread."""
    out: dict[tuple[int, int, str], Any] = {}
    windows = dict(plan.cost_cpu_windows)
    for m in sorted({c[0] for c in cases(plan)}):
        sub = dataclasses.replace(plan, models=m)  # the workers expect M models
        runs: dict[tuple[int, int, str], dict[str, list[float]]] = {
            c: {k: [] for k in kinds} for c in cases(plan) if c[0] == m}
        with ExitStack() as stack:
            peers = {k: stack.enter_context(peer(k, sub, keyed=True)) for k in kinds}
            for rep in range(plan.repeats):
                for c in runs:
                    n = windows.get(c[1], 1000)
                    for k in kinds:
                        # Fresh ENV_IDs: the worker remembers closed keys (late).
                        env = f"cost-{k}-{c[1]}-{c[2]}-{rep}"
                        warm = keyed_frames(m, c[1], env + "-warm", c[2])
                        form = packs(k, plan)
                        cpu_per_window(peers[k], warm, plan.inflight, max(10, n // 10), form)
                        rows = keyed_frames(m, c[1], env, c[2])
                        runs[c][k].append(1e6 * cpu_per_window(peers[k], rows, plan.inflight,
                                                               n, form))
        for c, by in runs.items():
            out[c] = {k: stat(v) for k, v in by.items()}
    return out


# -- the section ---------------------------------------------------------------------------


def uncounted(root: Path, models: int, actions: int, encoding: str, windows: int,
              warmup: int) -> None:
    """The workload without valgrind (`--quick`): it runs, nothing is counted."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(root)}
    argv = [sys.executable, str(WORKLOAD), "--models", str(models), "--actions",
            str(actions), "--encoding", encoding, "--windows", str(windows), "--warmup",
            str(warmup)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    if proc.returncode != 0:
        raise BenchError(f"cost workload failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


def cost_section(plan: Plan) -> dict[str, Any]:
    kinds = ("worker", "before") if plan.before else ("worker",)
    roots = {"worker": ROOT, "before": Path(plan.before) if plan.before else ROOT}
    jobs = {(c, k): (roots[k], *c) for c in cases(plan) for k in kinds}
    counted: dict[tuple[tuple[int, int, str], str], dict[str, Any] | None] = {}
    t0 = time.monotonic()
    count = instructions if plan.cost_count else uncounted
    with concurrent.futures.ThreadPoolExecutor(max_workers=plan.cost_parallel) as pool:
        futures = {key: pool.submit(count, root, m, a, e, plan.cost_windows,
                                    plan.cost_warmup) for key, (root, m, a, e) in jobs.items()}
        for key, fut in futures.items():
            counted[key] = fut.result()
    counting_s = time.monotonic() - t0
    cpu = cpu_times(plan, kinds)
    rows = []
    for c in cases(plan):
        row: dict[str, Any] = {"models": c[0], "actions": c[1], "encoding": c[2]}
        for k in kinds:
            row[k] = {"instructions": counted[(c, k)], "cpu_us_per_window": cpu[c][k]}
        rows.append(row)
    counting = (f"callgrind, {plan.cost_windows} lockstep windows after {plan.cost_warmup} "
                "uncounted, memory transport, in one process (bench/cost_workload.py)"
                if plan.cost_count else "not counted (--quick: the workload runs without "
                "valgrind)")
    return {"config": {"instructions": counting,
                       "cpu": f"/proc user+system of the worker process over a fixed number "
                              f"of keyed windows on ZeroMQ, K = {plan.inflight} in flight",
                       "cpu_windows": {str(a): n for a, n in plan.cost_cpu_windows},
                       "repeats": plan.repeats, "before": plan.before or None,
                       "counting_seconds": round(counting_s, 1)},
            "rows": rows}
