"""ZeroMQ sections `zmq_lockstep` and `zmq_pipelined`: JSON and binary logits, each beside
its floor in the same run, and where the lockstep microseconds go.

The peers and the handshake are `bench.zmq_bench`'s; the drivers here send any frames
(`[b"logits", JSON]`, or binary logits `[b"logits", JSON header, float32 values]`), all
encoded before the clock starts.

- lockstep: a window's M messages, then wait for its action; latency from the publish of
  the window's last message to the action's arrival. Floor: the ZeroMQ ping-pong (a peer
  that answers every M-th message without reading it), with the same frames.
- pipelined: keyed windows (ENV_ID, STEP), K windows outstanding (a new window when an
  action comes back). Floor: the bare receiver (`recv_multipart` + `orjson.loads` of each
  JSON frame, and `np.frombuffer` of the values of binary logits).
- breakdown (lockstep): the worker's own path, measured in this process with the worker's
  classes and a transport that only notes when the action is handed over (thread CPU
  time, median over windows): the earlier M - 1 messages, the last message up to the
  action, the books kept after it. Beside the ping-pong and the worker's latency, what is
  left is the wake-ups and the event loop.

With `--before DIR` (a checkout of an earlier commit) a worker run from DIR is measured
beside the current one, in the same run.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import zmq

from processor.messages import PACKED, pack, split_packed

from . import payloads
from .common import BenchError, CpuMeter, Plan, Run, ratio, summarize
from .zmq_bench import Peer, peer

Frames = tuple[bytes, ...]
JSON, BINARY = "json", "binary"


# -- messages ------------------------------------------------------------------------------


def packs(kind: str, plan: Plan) -> bool:
    """Whether a peer gets binary logits packed in one body (`processor.messages.pack`):
    every peer but a `before` worker whose checkout does not read them; that one gets the
    three frames, `[b"logits", JSON header, float32 values]`, the form it reads."""
    if kind != "before":
        return True
    return "def decode_packed" in (Path(plan.before) / "processor" / "messages.py").read_text()


def lockstep_frames(models: int, actions: int, encoding: str, packed: bool = True
                    ) -> list[list[Frames]]:
    """`[step][model]` complete messages of lockstep windows."""
    if encoding == BINARY:
        return [[(b"logits", pack(meta, values)) if packed else (b"logits", meta, values)
                 for meta, values in row]
                for row in payloads.lockstep_binary(models, actions)]
    return [[(b"logits", body) for body in row]
            for row in payloads.lockstep_bodies(models, actions)]


def keyed_frames(models: int, actions: int, env_id: str, encoding: str
                 ) -> list[list[tuple[bytes, Frames]]]:
    """`[step][model]` (JSON prefix cut before the STEP value, frames after the JSON)."""
    if encoding == BINARY:
        return [[(prefix, (values,)) for prefix, values in row]
                for row in payloads.keyed_binary_prefixes(models, actions, env_id)]
    return [[(prefix, ()) for prefix in row]
            for row in payloads.keyed_prefixes(models, actions, env_id)]


# -- drivers -------------------------------------------------------------------------------


def run_lockstep(p: Peer, rows: list[list[Frames]], steps: int, warmup: int,
                 max_s: float, stamps: list[tuple[int, int, int]] | None = None
                 ) -> tuple[Run, list[int]]:
    """Lockstep windows: steps/s, the latency from the last publish to the action, and how
    long the driver took to publish each window's messages (first to last publish).
    `stamps` gets each timed window's (first publish, last publish, action received)."""
    send, recv = p.link.pub.send_multipart, p.link.sub.recv_multipart
    pool = len(rows)
    clock = time.perf_counter_ns
    latencies: list[int] = []
    spans: list[int] = []
    meter = CpuMeter(peer=p.child.pid)
    max_ns = int(max_s * 1e9)
    done = 0
    start = 0
    gc.disable()
    try:
        for i in range(-warmup, steps):
            if i == 0:
                meter.start()
                start = clock()
            row = rows[i % pool]
            first = clock()
            for msg in row[:-1]:
                send(msg)
            t0 = clock()
            send(row[-1])
            while True:
                try:
                    topic, _ = recv()
                except zmq.Again:
                    p.child.check()
                    raise BenchError(f"{p.child.name}: no action for step {i}") from None
                if topic == b"action":
                    break
            t1 = clock()
            if i >= 0:
                latencies.append(t1 - t0)
                spans.append(t0 - first)
                if stamps is not None:
                    stamps.append((first, t0, t1))
                done += 1
                if t1 - start > max_ns:
                    break
        end = clock()
    finally:
        gc.enable()
    run = Run(done, (end - start) / 1e9, done * len(rows[0]), latencies)
    return meter.stop(run), spans


def _window_sender(send: Any, rows: list[list[tuple[bytes, Frames]]], packed: bool) -> Any:
    """`send_window(n)`: window n's M messages, its STEP filled in, JSON or binary (packed
    in one body, or in three frames)."""
    pool = len(rows)
    if rows[0][0][1] and packed:
        def window(n: int) -> None:
            for prefix, (values,) in rows[n % pool]:
                send((b"logits", pack(prefix + b"%d}" % n, values)))
    elif rows[0][0][1]:
        def window(n: int) -> None:
            for prefix, (values,) in rows[n % pool]:
                send((b"logits", prefix + b"%d}" % n, values))
    else:
        def window(n: int) -> None:
            for prefix, _ in rows[n % pool]:
                send((b"logits", prefix + b"%d}" % n))
    return window


def run_pipelined(p: Peer, rows: list[list[tuple[bytes, Frames]]], inflight: int,
                  windows: int, warmup: int, max_s: float, packed: bool = True) -> Run:
    """K keyed windows outstanding; the rate while the pipe is full, and any loss."""
    sub = p.link.sub
    recv = sub.recv_multipart
    loads = orjson.loads
    window = _window_sender(p.link.pub.send_multipart, rows, packed)
    clock = time.perf_counter_ns
    sent_at: dict[int, int] = {}
    latencies: list[int] = []
    meter = CpuMeter(peer=p.child.pid)
    max_ns = int(max_s * 1e9)
    warmup = max(warmup, 1)  # the clock starts at an action's arrival
    total = warmup + windows
    nxt = received = duplicates = done = 0
    start = end = 0
    sending = True
    gc.disable()
    try:
        for nxt in range(inflight):
            window(nxt)
            sent_at[nxt] = clock()
        nxt = inflight
        while sent_at:
            try:
                topic, body = recv()
            except zmq.Again:
                p.child.check()
                break  # nothing for action_timeout_s: what is outstanding is lost
            if topic != b"action":
                continue
            now = clock()
            t = sent_at.pop(loads(body)["STEP"], None)
            if t is None:
                duplicates += 1
                continue
            received += 1
            if received == warmup:
                meter.start()
                start = now
            elif received > warmup and sending:
                latencies.append(now - t)
            if not sending:
                continue
            if received >= total or (start and now - start > max_ns):
                sending, end, done = False, now, received - warmup
                continue
            window(nxt)
            sent_at[nxt] = clock()
            nxt += 1
    finally:
        gc.enable()
    if sending:
        raise BenchError(f"{p.child.name}: the pipeline stalled after {received} windows "
                         f"({len(sent_at)} outstanding lost)")
    run = Run(done, (end - start) / 1e9, done * len(rows[0]), latencies, lost=len(sent_at),
              duplicates=duplicates)
    return meter.stop(run)


# -- sections ------------------------------------------------------------------------------


def _workers(plan: Plan) -> tuple[str, ...]:
    return ("worker", "before") if plan.before else ("worker",)


@contextmanager
def _peers(kinds: Sequence[str], plan: Plan, keyed: bool = False) -> Iterator[dict[str, Peer]]:
    with ExitStack() as stack:
        yield {k: stack.enter_context(peer(k, plan, keyed=keyed)) for k in kinds}


def lockstep_cases(plan: Plan) -> list[tuple[int, str]]:
    return ([(a, JSON) for a in plan.lockstep_actions]
            + [(a, BINARY) for a in plan.lockstep_binary_actions])


def lockstep_section(plan: Plan) -> dict[str, Any]:
    cases = lockstep_cases(plan)
    frames = {c: lockstep_frames(plan.models, c[0], c[1]) for c in cases}
    kinds = (*_workers(plan), "transport", "pingpong")
    forms = {k: frames for k in kinds if packs(k, plan)}
    if len(forms) < len(kinds):  # a --before worker that reads binary in three frames only
        three = {c: lockstep_frames(plan.models, c[0], c[1], packed=False) for c in cases}
        forms.update({k: three for k in kinds if k not in forms})
    runs: dict[tuple[int, str], dict[str, list[Run]]] = {c: {k: [] for k in kinds}
                                                         for c in cases}
    spans: dict[tuple[int, str], list[int]] = {c: [] for c in cases}
    with _peers(kinds, plan) as peers:
        for _ in range(plan.repeats):
            for c in cases:
                for k in kinds:
                    run, span = run_lockstep(peers[k], forms[k][c], plan.lockstep_steps,
                                             plan.warmup_steps, plan.lockstep_max_s)
                    runs[c][k].append(run)
                    if k == "worker":
                        spans[c] += span
    rows = []
    for c in cases:
        row: dict[str, Any] = {"actions": c[0], "encoding": c[1],
                               "message_bytes": sum(map(len, frames[c][0][0][1:]))}
        for k in kinds:
            row[k] = summarize(runs[c][k])
        p = row["pingpong"]
        for k in _workers(plan):
            row[k]["ratio_p50"] = ratio(row[k], p, "p50_us")
            row[k]["ratio_p50_runs"] = _paired_ratios(runs[c][k], runs[c]["pingpong"])
            row[k]["ratio_steps_per_s"] = ratio(row[k], p, "steps_per_s")
        row["ratio_p50"] = row["worker"]["ratio_p50"]
        row["ratio_steps_per_s"] = row["worker"]["ratio_steps_per_s"]
        row["send_span_us"] = statistics.median(spans[c]) / 1e3
        row["breakdown"] = lockstep_breakdown(plan, c[0], c[1])
        # A floor for the p50 ratio: the ping-pong, plus the parse of the M texts less what
        # of it can overlap the driver's sending (the first message cannot be read before
        # it is sent, the last not before the span is over).
        wire = p["p50_us"]["median"]
        parse = row["breakdown"]["parse_all_us"]
        row["floor_ratio_p50"] = (wire + max(0.0, parse - row["send_span_us"])) / wire
        rows.append(row)
    for row, parts in zip(rows, traced_lockstep(plan, cases, frames)):
        row["breakdown"]["traced"] = parts
    return {"config": {"models": plan.models, "mode": "lockstep", "repeats": plan.repeats,
                       "steps_per_repeat": plan.lockstep_steps,
                       "max_s_per_repeat": plan.lockstep_max_s,
                       "warmup_steps": plan.warmup_steps, "metrics": "off (port 0)",
                       "deterministic": False, "before": plan.before or None,
                       "latency": "publish of the window's last message -> action received"},
            "rows": rows}


def traced_lockstep(plan: Plan, cases: Sequence[tuple[int, str]],
                    frames: dict[tuple[int, str], list[list[Frames]]]) -> list[dict[str, Any]]:
    """Each case once more, on a worker that notes its receives and actions in its own
    process (bench/trace_hook): where the latency goes, seen from inside the worker."""
    stamps: dict[tuple[int, str], list[tuple[int, int, int]]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory(prefix="swarm-trace-") as tmp:
        path = Path(tmp) / "trace.txt"
        with peer("worker", plan, trace=path) as p:
            for c in cases:
                run_lockstep(p, frames[c], plan.lockstep_steps, plan.warmup_steps,
                             plan.lockstep_max_s, stamps[c])
        notes = [line.split() for line in path.read_text().splitlines()]
    return [traced_parts(stamps[c], [(k, int(a), int(b), int(n)) for k, a, b, n in notes])
            for c in cases]


def traced_parts(stamps: Sequence[tuple[int, int, int]],
                 notes: Sequence[tuple[str, int, int, int]]) -> dict[str, Any]:
    """Medians (µs) over the windows, from the driver's stamps and the worker's notes:

    - in: from the last publish to the end of the worker's receive that read the last
      message (the wire, and the worker's reading);
    - worker: from there to the action handed to the socket (decoding, windows,
      aggregation, encoding);
    - out: from there to the action in the driver's hands (the hand-over and the wire
      back; measured from the start of the hand-over, since a worker thread that loses
      its core right after sending notes its end after the driver already has the action);
    - late: how many of the window's messages the worker read only after the last
      publish, when nothing is left to overlap their decoding with.
    """
    reads = [n for n in notes if n[0] == "r"]
    ends = [n[2] for n in reads]
    sends = [n for n in notes if n[0] == "p"]
    starts = [n[1] for n in sends]
    parts: dict[str, list[float]] = {"in_us": [], "worker_us": [], "out_us": [], "late": []}
    for first, t0, t1 in stamps:
        window = reads[bisect.bisect_left(ends, first):bisect.bisect_right(ends, t1)]
        k = bisect.bisect_left(starts, t0)
        if not window or k == len(sends) or sends[k][1] > t1:
            continue  # (a window the notes do not cover)
        last, send = window[-1], sends[k]
        parts["in_us"].append((last[2] - t0) / 1e3)
        parts["worker_us"].append((send[1] - last[2]) / 1e3)
        parts["out_us"].append((t1 - send[1]) / 1e3)
        parts["late"].append(sum(n[3] for n in window if n[2] > t0))
    out: dict[str, Any] = {"windows": len(parts["late"]), "of": len(stamps)}
    out.update({k: statistics.median(v) if v else None for k, v in parts.items()})
    return out


def _paired_ratios(worker: Sequence[Run], base: Sequence[Run], q: float = 50) -> list[float]:
    """The worker's p50 over the floor's, repeat by repeat (measured back to back)."""
    from .common import percentile

    return [percentile(sorted(w.latencies_ns), q) / percentile(sorted(b.latencies_ns), q)
            for w, b in zip(worker, base)]


def pipelined_section(plan: Plan) -> dict[str, Any]:
    cases = [(a, e) for a in plan.pipelined_actions for e in (JSON, BINARY)]
    kinds = (*_workers(plan), "raw")
    runs: dict[tuple[int, str], dict[str, list[Run]]] = {c: {k: [] for k in kinds}
                                                         for c in cases}
    with _peers(kinds, plan, keyed=True) as peers:
        for rep in range(plan.repeats):
            for c in cases:
                for k in kinds:
                    # A fresh ENV_ID per run: the worker remembers closed keys (late).
                    rows = keyed_frames(plan.models, c[0], f"{k}-{c[0]}-{c[1]}-{rep}", c[1])
                    runs[c][k].append(run_pipelined(peers[k], rows, plan.inflight,
                                                    plan.pipelined_windows, plan.warmup_steps,
                                                    plan.pipelined_max_s, packs(k, plan)))
    out = []
    for c in cases:
        row: dict[str, Any] = {"actions": c[0], "encoding": c[1]}
        for k in kinds:
            row[k] = summarize(runs[c][k], messages=True)
        for k in _workers(plan):
            row[k]["ratio_messages_per_s"] = ratio(row[k], row["raw"], "messages_per_s")
            row[k]["ratio_runs"] = [w.messages_per_s / r.messages_per_s
                                    for w, r in zip(runs[c][k], runs[c]["raw"])]
        row["ratio_messages_per_s"] = row["worker"]["ratio_messages_per_s"]
        out.append(row)
    by = {(r["actions"], r["encoding"]): r for r in out}
    for a in plan.pipelined_actions:
        b, j = by[(a, BINARY)], by[(a, JSON)]
        for k in _workers(plan):
            b[k]["binary_over_json"] = ratio(b[k], j[k], "steps_per_s")
            b[k]["binary_over_json_runs"] = [x.steps_per_s / y.steps_per_s for x, y in
                                             zip(runs[(a, BINARY)][k], runs[(a, JSON)][k])]
    return {"config": {"models": plan.models, "key": ["ENV_ID", "STEP"],
                       "inflight_windows": plan.inflight, "repeats": plan.repeats,
                       "windows_per_repeat": plan.pipelined_windows,
                       "max_s_per_repeat": plan.pipelined_max_s, "metrics": "off (port 0)",
                       "before": plan.before or None,
                       "raw": "recv_multipart + orjson.loads of the JSON frame (+ np.frombuffer "
                              "of binary values)",
                       "latency": "last message of a window -> its action, queueing behind "
                                  "the other windows in flight included"},
            "rows": out}


# -- the lockstep path in process ----------------------------------------------------------


class _Probe:
    """A transport that notes when the action is handed over, and nothing else."""

    acks = False
    ready = True

    def __init__(self) -> None:
        self.on_reject: Any = None
        self.at = 0

    async def publish(self, topic: str, payload: bytes, dedup: str | None = None) -> bool:
        self.at = time.thread_time_ns()
        return True

    async def settle(self, tokens: list[Any]) -> None:
        pass

    def stamp(self, topic: str) -> dict[str, Any] | None:
        return None


def _json_part(m: bytes | tuple[bytes, bytes]) -> bytes:
    """The JSON of a payload: the text itself, or the header of binary logits."""
    if isinstance(m, tuple):
        return m[0]
    return split_packed(m)[0] if m[:1] == PACKED else m


def lockstep_breakdown(plan: Plan, actions: int, encoding: str) -> dict[str, Any]:
    """The worker's CPU time per lockstep window, in this process, by part (µs, median)."""
    from processor.aggregate import use_one_thread
    from processor.config import from_mapping
    from processor.messages import decode_logits
    from processor.worker import Worker

    use_one_thread()
    cfg = from_mapping({"window": {"models": plan.models, "timeout_ms": 0},
                        "metrics": {"port": 0}})
    probe = _Probe()
    worker = Worker(cfg, probe)  # type: ignore[arg-type]
    rows = [[m[1] if len(m) == 2 else (m[1], m[2]) for m in row]
            for row in lockstep_frames(plan.models, actions, encoding)]
    lim = cfg.limits
    clock = time.thread_time_ns
    parts: dict[str, list[int]] = {"earlier": [], "to_action": [], "books": [], "decode": [],
                                   "aggregate": [], "parse": []}
    loads = orjson.loads
    det = np.zeros(1, dtype=bool)

    async def go(n: int) -> None:
        for i in range(n):
            row = rows[i % len(rows)]
            now = time.monotonic()
            t0 = clock()
            await worker.handle([("logits", m, now, None) for m in row[:-1]])
            t1 = clock()
            await worker.handle([("logits", row[-1], now, None)])
            t2 = clock()
            last = decode_logits(row[-1], (), lim.max_message_bytes, lim.max_actions,
                                 lim.max_batch)
            t3 = clock()
            x = np.concatenate([last.logits] * plan.models).reshape(1, plan.models, 1, -1)
            t4 = clock()
            worker.strategy.decide(x, det)
            t5 = clock()
            for m in row:
                loads(_json_part(m))
            t6 = clock()
            parts["parse"].append(t6 - t5)
            parts["aggregate"].append(t5 - t4)
            parts["earlier"].append(t1 - t0)
            parts["to_action"].append(probe.at - t1)
            parts["books"].append(t2 - probe.at)
            parts["decode"].append(t3 - t2)

    n = max(20, plan.breakdown_windows)
    gc.disable()
    try:
        asyncio.run(go(n // 4))  # warm-up
        for v in parts.values():
            v.clear()
        asyncio.run(go(n))
    finally:
        gc.enable()
    med = {k: statistics.median(v) / 1e3 for k, v in parts.items()}
    return {"windows": n, "clock": "thread CPU time", "earlier_messages_us": med["earlier"],
            "last_message_to_action_us": med["to_action"],
            "last_message_decode_us": med["decode"], "aggregate_us": med["aggregate"],
            "books_after_action_us": med["books"],
            # orjson.loads of the window's M texts (JSON headers, for binary frames): what
            # any worker in Python pays at least, whatever else it does
            "parse_all_us": med["parse"]}
