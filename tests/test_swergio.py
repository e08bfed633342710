"""swergio end to end: the worker against the real swergio 0.0.2 server (PyPI), with peers
that are real swergio Clients, all on 127.0.0.1 with ports picked at run time; and the
transport's framing against a raw fake server.

The drop-in promise: in a swergio pipeline the environment, model and evolution components
of the RLGym example do not change when the seed's aggregation component is replaced by the
worker. The peers in tests/swergio_peers.py are written the way those components are.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Self

import numpy as np
import pytest

from processor.config import from_mapping
from processor.metrics import Metrics
from processor.worker import Worker
from tests.procs import free_port, wait_for
from tests.swergio_peers import (
    HOST,
    WORKER_NAME,
    Collector,
    Environment,
    Evolution,
    WorkerThread,
    data,
    model,
    process_output,
    start_pipeline,
    swergio_server,
    worker_process,
    worker_toml,
)
from transports import create
from transports.swergio import FrameError, frame, parse_header

ACTIONS = 6
HEX32 = re.compile(r"[0-9a-f]{32}")
WORKER_ROOMS = ("_command", "logits", "evolution", "action")


# -- an independent reference of the seed's get_action --------------------------------------


def reference(logits: dict[str, list[float]], action: int | None = None
              ) -> tuple[int, dict[str, float], np.ndarray]:
    """The seed's formula in float64 numpy: p_m = softmax(logits_m), P = sum_m p_m,
    action = argmax P (numpy's argmax, like torch's, takes the lowest index of a tie) unless
    given, credit_m = p_m[a] / P[a]. Returns (action, credit by model, P)."""
    ids = list(logits)
    x = np.array([logits[m] for m in ids], dtype=np.float32).astype(np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    total = p.sum(axis=0)
    a = int(np.argmax(total)) if action is None else action
    return a, {m: float(p[i, a] / total[a]) for i, m in enumerate(ids)}, total


def logits_table(rng: np.random.Generator, steps: int, models: int,
                 tie_every: int = 0) -> tuple[dict[int, list[list[float]]], set[int]]:
    """Per step, one row of float32-representable logits per model. Random steps are drawn
    again until the best action beats the second by 1e-3 (the worker computes in float32,
    as the seed does, the reference in float64).

    Every `tie_every`-th step is an exact tie between two actions i < j, and the action
    must be i. An equal logit for i and j in every model is not enough: softmax gives
    p_m[i] == p_m[j], but torch sums the columns of P in different orders, so P[i] and P[j]
    may differ by an ulp in float32 (the seed's own get_action then picks either). Here
    every model gives i and j the logit 0 and the other actions -120 or less, whose
    probabilities underflow to 0 in float32: p_m = 1/2 at i and j, exactly, and P ties
    exactly whatever the order of the sum."""
    table: dict[int, list[list[float]]] = {}
    ties: set[int] = set()
    for step in range(steps):
        if tie_every and step % tie_every == tie_every // 2:
            x = rng.uniform(-150, -120, (models, ACTIONS)).astype(np.float32)
            i, j = rng.choice(ACTIONS, 2, replace=False).tolist()
            x[:, i] = 0.0
            x[:, j] = 0.0
            ties.add(step)
        else:
            while True:
                x = rng.normal(0, 2, (models, ACTIONS)).astype(np.float32)
                p = np.exp(x.astype(np.float64))
                total = (p / p.sum(axis=1, keepdims=True)).sum(axis=0)
                top2 = np.sort(total)[-2:]
                if top2[1] - top2[0] > 1e-3:
                    break
        table[step] = [row.tolist() for row in x]
    return table, ties


def check_action_message(msg: dict[str, Any], obs: dict[str, Any]) -> None:
    """What a swergio component's reply carries, and the fields of the observation that
    swergio propagates from the message that triggered the reply."""
    assert msg["TYPE"] == "DATA/CUSTOM"
    assert msg["TO_ROOM"] == "action"
    assert msg["SENT_BY"] == WORKER_NAME
    assert HEX32.fullmatch(msg["ID"]), msg["ID"]
    assert msg["ROOT_ID"] == obs["ROOT_ID"]
    assert msg["MODEL_STATUS"] == obs["MODEL_STATUS"]
    assert "PARTIAL" not in msg and "MODELS" not in msg
    assert isinstance(msg["ACTION"], list) and len(msg["ACTION"]) == 1


def expected_contribution(env: Environment, sent: dict[int, dict[str, list[float]]],
                          steps: range) -> dict[str, float]:
    out: dict[str, float] = {}
    for step in steps:
        _, credit, _ = reference(sent[step], env.actions[step]["ACTION"][0])
        for m, c in credit.items():
            out[m] = out.get(m, 0.0) + c
    return out


def close_all(*peers: Any) -> None:
    for p in peers:
        p.close()


# -- 1. drop-in ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_drop_in_replacement_of_the_seed_in_a_swergio_pipeline():
    """20 models, an environment and the evolution component, unchanged swergio clients
    through the unchanged swergio server; the worker as `swarm-aggregator run -c FILE`."""
    models, steps, half = 20, 300, 150
    table, ties = logits_table(np.random.default_rng(73983450), steps, models, tie_every=25)
    sampled = {s for s in range(steps) if s % 10 == 9} - ties  # DETERMINISTIC false
    sent: dict[int, dict[str, list[float]]] = {}
    port = free_port()
    peers: list[Any] = []
    with swergio_server(port):
        evo = Evolution(port).start()
        peers.append(evo)
        try:
            evo.sync(port)  # from here on it sees every join, the worker's included
            with worker_process(worker_toml(port, models)) as proc:
                mods = [model(port, i, table, sent).start() for i in range(models)]
                peers += mods
                env = Environment(port, deterministic=lambda s: s not in sampled).start()
                peers.append(env)
                evo.wait_joined({(WORKER_NAME, r) for r in WORKER_ROOMS}
                                | {(m.name, "logits") for m in mods}
                                | {("environment", "observation")})
                assert evo.handshake()["CONTRIBUTION"] == {}

                t0 = time.monotonic()
                env.run(0, half, timeout=60)
                # Evolution traffic that is not a GET: ignored, no reply.
                evo.send(data("evolution", WEIGHTS=[[0.5] * 64] * 8))
                evo.send(data("evolution", CMD="SET", WEIGHTS=[0.1] * 32))
                first = evo.get()
                env.run(half, steps - half, timeout=60)
                second = evo.get()
                third = evo.get()
                elapsed = time.monotonic() - t0

                proc.send_signal(signal.SIGTERM)
                assert proc.wait(10) == 0
                log = process_output(proc)
        finally:
            close_all(*peers)

    # Every step answered once, in order, with the seed's action.
    assert sorted(env.actions) == list(range(steps))
    ids = set()
    differs_from_argmax = 0
    for step in range(steps):
        msg, obs = env.actions[step], env.observations[step]
        check_action_message(msg, obs)
        ids.add(msg["ID"])
        assert sorted(sent[step]) == sorted(m.name for m in mods)
        best, _, total = reference(sent[step])
        got = msg["ACTION"][0]
        if step in sampled:
            assert 0 <= got < ACTIONS and total[got] > 0
            differs_from_argmax += got != best
        else:
            assert got == best, f"step {step}: action {got}, reference {best} (P={total})"
        if step in ties:  # an exact tie of two actions, and the lower index won (above)
            assert np.count_nonzero(total == total.max()) == 2
    assert len(ids) == steps
    assert differs_from_argmax > 0, "DETERMINISTIC=false never sampled anything but argmax"

    # GET: the seed's sums of p_m[a]/P[a] since the previous GET, by COMPONENT_ID, then reset.
    for reply, span in ((first, range(half)), (second, range(half, steps))):
        assert reply["TYPE"] == "DATA/CUSTOM" and reply["TO_ROOM"] == "evolution"
        assert reply["SENT_BY"] == WORKER_NAME and HEX32.fullmatch(reply["ID"])
        want = expected_contribution(env, sent, span)
        assert set(reply["CONTRIBUTION"]) == set(want)
        for m, v in want.items():
            assert reply["CONTRIBUTION"][m] == pytest.approx(v, abs=1e-5), m
        assert sum(reply["CONTRIBUTION"].values()) == pytest.approx(len(span), abs=1e-4)
    assert third["CONTRIBUTION"] == {}
    assert evo.replies.empty()  # WEIGHTS and CMD=SET got no reply

    assert "transport=swergio" in log and f"{HOST}:{port}" in log
    assert "rejected message" not in log  # ordinary swergio traffic is not refused
    print(f"\n{steps} steps of {models} models in {elapsed:.1f}s "
          f"({elapsed / steps * 1000:.0f} ms/step)")


# -- 2. reconnect --------------------------------------------------------------------------


def _ready(port: int) -> int:
    try:
        return int(urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=2).status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def _check_steps(env: Environment, sent: dict, steps: range) -> None:
    for step in steps:
        check_action_message(env.actions[step], env.observations[step])
        assert env.actions[step]["ACTION"] == [reference(sent[step])[0]], step


@pytest.mark.timeout(90)
def test_worker_reconnects_and_rejoins_after_the_server_restarts():
    models, n = 3, 20
    table, _ = logits_table(np.random.default_rng(5), 2 * n, models)
    sent: dict[int, dict[str, list[float]]] = {}
    port, mport = free_port(), free_port()
    with worker_process(worker_toml(port, models, metrics_port=mport)) as proc:
        with swergio_server(port) as first_server:
            evo, env, peers, _ = start_pipeline(port, models, table, sent)
            try:
                assert _ready(mport) == 200
                env.run(0, n, timeout=30)
                reply = evo.get()
            finally:
                close_all(*peers)
            first_server.kill()
            first_server.wait(5)
        _check_steps(env, sent, range(n))
        assert set(reply["CONTRIBUTION"]) == {f"model-{i}" for i in range(models)}

        # The worker notices (readiness goes down) and stays up, retrying with backoff.
        wait_for(lambda: _ready(mport) == 503, 10, "/readyz to report the transport down")
        assert proc.poll() is None

        with swergio_server(port):
            # start_pipeline waits until the worker answers a GET through the new server: it
            # reconnected and joined its rooms again.
            evo, env, peers, _ = start_pipeline(port, models, table, sent)
            try:
                wait_for(lambda: _ready(mport) == 200, 10, "/readyz after the reconnect")
                env.run(n, n, timeout=30)
                after = evo.get()
            finally:
                close_all(*peers)
            _check_steps(env, sent, range(n, 2 * n))
            want = expected_contribution(env, sent, range(n, 2 * n))
            assert after["CONTRIBUTION"] == pytest.approx(want, abs=1e-5)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        log = process_output(proc)
    assert log.count("swergio: connected to") == 2
    assert "reconnecting" in log


# -- 3. bad input --------------------------------------------------------------------------


def junk(seq: int) -> list[tuple[str | None, dict[str, Any]]]:
    """Valid JSON in room logits that is not a valid logits message, with the rejection
    reason each must be counted under (None: not a logits message at all, ignored; a
    null among the logits may count as either of its two reasons)."""
    ok = [0.5] * ACTIONS
    out: list[tuple[str | None, dict[str, Any]]] = [
        ("missing_field", {"LOGITS": ok}),
        (None, {"COMPONENT_ID": "junk"}),
        ("bad_logits", {"LOGITS": "0.1,0.2", "COMPONENT_ID": "junk"}),
        ("bad_logits", {"LOGITS": ["a", "b", "c"], "COMPONENT_ID": "junk"}),
        ("bad_logits", {"LOGITS": [[[0.1, 0.2]]], "COMPONENT_ID": "junk"}),
        ("bad_logits", {"LOGITS": [[0.1, 0.2], [0.3]], "COMPONENT_ID": "junk"}),
        ("bad_logits", {"LOGITS": [], "COMPONENT_ID": "junk"}),
        ("bad_logits", {"LOGITS": {"a": 1}, "COMPONENT_ID": "junk"}),
        ("bad_deterministic", {"LOGITS": ok, "COMPONENT_ID": "junk", "DETERMINISTIC": "yes"}),
        ("bad_component_id", {"LOGITS": ok, "COMPONENT_ID": True}),
        ("bad_component_id", {"LOGITS": ok, "COMPONENT_ID": {"id": 1}}),
        ("bad_component_id", {"LOGITS": ok, "COMPONENT_ID": ""}),
        ("bad_logits", {"LOGITS": [None] + ok[1:], "COMPONENT_ID": "junk"}),
    ]
    return [(r, {**m, "SEQ": f"{seq}-{i}"}) for i, (r, m) in enumerate(out)]


@pytest.mark.timeout(90)
def test_bad_logits_over_swergio_are_counted_and_valid_steps_still_answered():
    """Three models: two answer observations by themselves, the third is sent by the test,
    so that junk lands in a half-full window at a known point: after the first two models'
    logits reached the worker (the junk sender saw them forwarded) and before the third's
    (the third waits until it saw the last junk message forwarded; the server forwards a
    room's messages one at a time, under one lock)."""
    models, steps = 3, 30
    table, _ = logits_table(np.random.default_rng(11), steps, models)
    sent: dict[int, dict[str, list[float]]] = {}
    port = free_port()
    cfg = from_mapping({"transport": {"kind": "swergio",
                                      "swergio": {"host": HOST, "port": port}},
                        "window": {"models": models, "key": [], "timeout_ms": 0},
                        "metrics": {"port": 0}})
    expected: dict[str, int] = {}
    peers: list[Any] = []
    with swergio_server(port), WorkerThread(cfg) as worker:
        try:
            evo = Evolution(port).start()
            peers.append(evo)
            evo.sync(port)
            auto = [model(port, i, table, sent).start() for i in range(2)]
            peers += auto
            last = Collector("model-2", port, "logits").start()   # the third model
            bad = Collector("intruder", port, "logits").start()
            env = Environment(port).start()
            peers += [last, bad, env]
            evo.wait_joined({(p.name, "logits") for p in (*auto, last, bad)}
                            | {("environment", "observation")})
            evo.handshake()

            for step in range(steps):
                if step % 3 == 0:  # junk between steps: never opens a window
                    for reason, msg in junk(1000 + step):
                        bad.send(data("logits", **msg))
                        if reason:
                            expected[reason] = expected.get(reason, 0) + 1
                obs = env.begin(step)
                root = obs["ROOT_ID"]
                for i in range(2):
                    bad.wait_seen(lambda m, i=i, root=root: m.get("ROOT_ID") == root
                                  and m.get("COMPONENT_ID") == f"model-{i}", f"model-{i}")
                batch = junk(step)
                # Valid logits, wrong for this window: a second message of model-0 (in
                # lockstep the newer replaces the older, as the seed; counted; here with the
                # same values so the action stays the reference's), and another shape.
                batch.append(("duplicate", {"LOGITS": table[step][0], "COMPONENT_ID": "model-0",
                                            "DETERMINISTIC": True, "SEQ": f"{step}-dup"}))
                batch.append(("shape", {"LOGITS": [9.0] * (ACTIONS + 1), "COMPONENT_ID": "odd",
                                        "DETERMINISTIC": True, "SEQ": f"{step}-shape"}))
                for reason, msg in batch:
                    bad.send(data("logits", **msg))
                    if reason:
                        expected[reason] = expected.get(reason, 0) + 1
                last.wait_seen(lambda m, tag=f"{step}-shape": m.get("SEQ") == tag,
                               "the last junk")
                logits = table[step][2]
                sent.setdefault(step, {})["model-2"] = logits
                last.send(data("logits", LOGITS=logits, COMPONENT_ID="model-2",
                               DETERMINISTIC=True, ROOT_ID="completing-" + root,
                               MODEL_STATUS=obs["MODEL_STATUS"], SENT_BY="model-2"))
                env.wait(timeout=10)
                msg = env.actions[step]
                # ROOT_ID comes from the message that completed the window, as swergio's
                # client takes it from the message that triggered the reply.
                assert msg["ROOT_ID"] == "completing-" + root
                check_action_message(msg, {**obs, "ROOT_ID": "completing-" + root})
                assert msg["ACTION"] == [reference(sent[step])[0]], step
            reply = evo.get()
            assert worker.alive
            for reason, n in expected.items():
                assert worker.rejected(reason) == n, reason
            assert worker.transport.connects == 1  # bad messages are not bad frames
            assert worker.rejected("bad_frame") == 0
            closed = worker.metrics.registry.get_sample_value
            assert closed("swarm_aggregator_windows_closed_total", {"outcome": "complete"}) \
                == steps
            want = expected_contribution(env, sent, range(steps))
            assert reply["CONTRIBUTION"] == pytest.approx(want, abs=1e-5)
        finally:
            close_all(*peers)


# -- framing, unit level -------------------------------------------------------------------


def test_frame_is_swergios_header_then_body():
    body = json.dumps({"TYPE": "DATA/CUSTOM", "TO_ROOM": "action", "ACTION": [3]}).encode()
    # What swergio's own client and server write: f"{len:<{header_length}}", then the body.
    assert frame(body, 10) == f"{len(body):<10}".encode() + body
    assert frame(b"", 10) == b"0         "
    assert frame("é".encode(), 4) == b"2   " + "é".encode()  # bytes, not characters
    assert frame(b"x" * 99, 2) == b"99" + b"x" * 99
    with pytest.raises(ValueError):
        frame(b"x" * 100, 2)  # a length that does not fit the header


@pytest.mark.parametrize("header,n", [(b"7         ", 7), (b"0         ", 0),
                                      (b"1234567890", 1234567890), (b"  12      ", 12)])
def test_parse_header_reads_lengths(header, n):
    assert parse_header(header) == n


@pytest.mark.parametrize("header", [b"abcdefghij", b"-5        ", b"+5        ", b"          ",
                                    b"1 2       ", b"0x1f      ", b"1.5       ", b"\x00" * 10,
                                    "٣".encode().ljust(10), b"1_000     "])
def test_parse_header_refuses_what_is_not_a_length(header):
    with pytest.raises(FrameError):
        parse_header(header)


# -- a fake swergio server speaking raw frames ---------------------------------------------


class FakeServer:
    """A plain asyncio TCP server that speaks swergio's framing; the test scripts each
    connection it accepts."""

    def __init__(self) -> None:
        self.conns: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
            asyncio.Queue()
        self.accepted: list[float] = []
        self.done = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._accept, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.done.set()
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted.append(time.monotonic())
        self.writers.append(w)
        await self.conns.put((r, w))
        await self.done.wait()  # the connection lives until the test closes it

    async def next(self, timeout: float = 5.0) -> tuple[asyncio.StreamReader,
                                                         asyncio.StreamWriter]:
        return await asyncio.wait_for(self.conns.get(), timeout)


async def read_frame(r: asyncio.StreamReader, timeout: float = 5.0) -> dict[str, Any]:
    """A frame as swergio's server reads one (written here independently of the
    transport's reader)."""
    header = await asyncio.wait_for(r.readexactly(10), timeout)
    n = int(header.decode())
    assert header == f"{n:<10}".encode()
    body = await asyncio.wait_for(r.readexactly(n), timeout)
    obj: dict[str, Any] = json.loads(body)
    return obj


async def expect_join(r: asyncio.StreamReader) -> None:
    """REGISTER with the worker's NAME, then JOINROOM for each room, all to `_command`."""
    reg = await read_frame(r)
    assert reg["TYPE"] == "COMMAND/REGISTER" and reg["NAME"] == WORKER_NAME
    assert reg["TO_ROOM"] == "_command" and HEX32.fullmatch(reg["ID"])
    rooms = []
    for _ in WORKER_ROOMS:
        j = await read_frame(r)
        assert j["TYPE"] == "COMMAND/JOINROOM" and j["TO_ROOM"] == "_command"
        rooms.append(j["ROOM"])
    assert rooms == list(WORKER_ROOMS)


def raw(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj).encode()
    return f"{len(body):<10}".encode() + body


def solo_logits(logits: list[float]) -> bytes:
    return raw({"ID": uuid.uuid4().hex, "TYPE": "DATA/CUSTOM", "TO_ROOM": "logits",
                "LOGITS": logits, "COMPONENT_ID": "solo", "DETERMINISTIC": True,
                "SENT_BY": "solo"})


class InLoopWorker:
    """The worker in the test's event loop, on a given config."""

    def __init__(self, port: int, **sections: Any) -> None:
        swergio = {"host": HOST, "port": port, "reconnect_min_s": 0.05,
                   "reconnect_max_s": 1.0, **sections.pop("swergio", {})}
        self.cfg = from_mapping({"transport": {"kind": "swergio", "swergio": swergio},
                                 "window": {"models": 1, "key": [], "timeout_ms": 0},
                                 "metrics": {"port": 0}, **sections})
        self.metrics = Metrics()
        self.transport = create(self.cfg, on_reject=lambda r, d: self.worker.reject(r, d))
        self.worker = Worker(self.cfg, self.transport, self.metrics)
        self.stop = asyncio.Event()

    async def __aenter__(self) -> Self:
        self.task = asyncio.create_task(self.worker.run(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 5)  # re-raises whatever ended the worker

    def rejected(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value(
            "swarm_aggregator_messages_rejected_total", {"reason": reason}) or 0.0

    async def until(self, cond: Any, what: str, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while not cond():
            assert not self.task.done(), f"the worker ended: {self.task}"
            assert time.monotonic() < end, f"timed out waiting for {what}"
            await asyncio.sleep(0.005)


async def eof(r: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True when the peer closed the connection (after whatever it still sent)."""
    async def drain() -> bool:
        while await r.read(65536):
            pass
        return True
    return await asyncio.wait_for(drain(), timeout)


@pytest.mark.timeout(30)
async def test_bad_headers_are_counted_and_the_transport_reconnects():
    async with FakeServer() as srv, InLoopWorker(
            srv.port, limits={"max_message_bytes": 1000}) as w:
        # 1: a header that is not a number. The stream cannot be resynchronised: the worker
        # counts a bad frame, drops the connection, connects again and joins again.
        r, wr = await srv.next()
        await expect_join(r)
        wr.write(b"abcdefghij" + b"{}")
        await w.until(lambda: w.rejected("bad_frame") == 1, "bad_frame 1")
        assert await eof(r)

        # 2: a negative length.
        r, wr = await srv.next()
        await expect_join(r)
        wr.write(b"-5        12345")
        await w.until(lambda: w.rejected("bad_frame") == 2, "bad_frame 2")
        assert await eof(r)

        # 3: a frame over limits.max_message_bytes is skipped unread and the stream stays in
        # step; a frame split across writes is put together; then a partial header and EOF.
        r, wr = await srv.next()
        await expect_join(r)
        wr.write(b"5000      " + b"x" * 5000)
        msg = solo_logits([0.0, 2.0, 1.0])
        wr.write(msg[:4])
        await wr.drain()
        await asyncio.sleep(0.05)  # let the worker see the first piece alone
        wr.write(msg[4:20])
        await wr.drain()
        await asyncio.sleep(0.05)
        wr.write(msg[20:])
        action = await read_frame(r)
        assert action["ACTION"] == [1] and action["TO_ROOM"] == "action"
        assert action["TYPE"] == "DATA/CUSTOM" and action["SENT_BY"] == WORKER_NAME
        assert w.rejected("too_large") == 1
        wr.write(b"12")
        wr.close()

        # 4: reconnected without another bad frame (a cut-off stream is not a bad header).
        r, wr = await srv.next()
        await expect_join(r)
        wr.write(solo_logits([3.0, 0.0, 1.0]))
        assert (await read_frame(r))["ACTION"] == [0]
        assert w.rejected("bad_frame") == 2
        assert w.transport.connects == 4
        assert not w.task.done()
    # A clean stop says goodbye as swergio's client does.
    bye = await read_frame(r)
    assert bye["TYPE"] == "COMMAND/DISCONNECT" and bye["TO_ROOM"] == "_command"


@pytest.mark.timeout(30)
async def test_reconnect_backoff_grows_while_connections_die_young_and_resets_after():
    """A server that accepts and drops the worker at once must not be hammered: the
    delay doubles (0.05, 0.1, 0.2, 0.4 s) until a connection delivers a frame."""
    async with FakeServer() as srv, InLoopWorker(srv.port):
        for _ in range(5):
            r, wr = await srv.next()
            await expect_join(r)
            wr.close()
        # The sixth connection is healthy: it delivers a frame, then drops.
        r, wr = await srv.next()
        await expect_join(r)
        wr.write(raw({"ID": uuid.uuid4().hex, "TYPE": "COMMAND/REGISTER", "NAME": "other",
                      "TO_ROOM": "_command", "SENT_BY": "other"}))
        await wr.drain()
        await asyncio.sleep(0.1)  # let the worker read it before the drop
        wr.close()
        await srv.next()
    gaps = np.diff(srv.accepted)
    for i, floor in enumerate((0.05, 0.1, 0.2, 0.4, 0.8)):
        assert gaps[i] >= floor * 0.9, (i, gaps.tolist())
    # After the healthy connection: the minimum delay again (0.05 s, plus the 0.1 s the
    # connection lived), not the 1.0 s (reconnect_max_s here) that the next doubling would
    # reach; the line sits there, so that a loaded machine's slowness cannot cross it.
    assert gaps[5] < 1.0, gaps.tolist()
