"""NATS JetStream end to end: a real nats-server on loopback, workers as real processes.

Each test starts its own nats-server (JetStream, file storage in a temporary folder) and
stops it, and everything else it started, at the end.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

import transports.nats as tnats
from processor.config import from_mapping
from processor.errors import ConfigError
from tests.nats_helpers import NatsServer, Swarm, nats_worker, server_binary
from tests.procs import ROOT, free_port, metric, output
from tests.reference import clear_winner, sum_probs

pytestmark = [pytest.mark.timeout(90),
              pytest.mark.skipif(server_binary() is None, reason="no nats-server binary")]

MODELS, ACTIONS = 3, 6


@pytest.fixture
def server(tmp_path):
    srv = NatsServer(tmp_path / "jetstream").start()
    try:
        yield srv
    finally:
        srv.stop()


def config(url: str, **nats_keys):
    return from_mapping({"transport": {"kind": "nats", "nats": {"servers": [url], **nats_keys}},
                         "window": {"key": ["ENV_ID", "STEP"], "models": MODELS}})


def logits(rng, envs, steps) -> dict[tuple[str, int], np.ndarray]:
    return {(e, s): rng.normal(0, 2, (MODELS, ACTIONS)).astype(np.float32)
            for s in range(steps) for e in envs}


def check_actions(actions: list[dict], xs: dict[tuple[str, int], np.ndarray]) -> dict:
    """Exactly one action per step, equal to the reference; returns the expected credit."""
    keys = [(a["ENV_ID"], a["STEP"]) for a in actions]
    assert len(keys) == len(set(keys)), "a step has two actions"
    assert set(keys) == set(xs), f"{len(set(xs) - set(keys))} steps have no action"
    credit: dict[str, float] = {}
    for a in actions:
        x = xs[(a["ENV_ID"], a["STEP"])][:, None, :]
        total, best, _ = sum_probs(x)
        assert "PARTIAL" not in a, a
        if clear_winner(total):
            assert a["ACTION"] == best.tolist(), a
        _, _, c = sum_probs(x, np.array(a["ACTION"]))
        for m in range(MODELS):
            credit[f"m{m}"] = credit.get(f"m{m}", 0.0) + float(c[m, 0])
    return credit


async def held(swarm: Swarm, partitions: set[int], n: int) -> bool:
    infos = await swarm.consumers()
    return sum(c.num_ack_pending for c in infos
               if int(c.name.split("-")[1]) in partitions) == n


async def test_three_workers_on_eight_partitions_one_action_per_step(server):
    cfg = config(server.url)
    await tnats.setup(cfg)
    envs = [f"env{i}" for i in range(40)]
    xs = logits(np.random.default_rng(0), envs, 10)   # 400 steps
    async with Swarm(server.url) as swarm:
        # Published before any worker runs: the stream keeps them, partitioned by the
        # server exactly as partition_of predicts.
        for s in range(5):
            for e in envs:
                await swarm.step(e, s, xs[(e, s)])
        per_part = [0] * 8
        for e in envs:
            per_part[tnats.partition_of(e, 8)] += 5 * MODELS
        assert [c.num_pending for c in await swarm.consumers()] == per_part
        with nats_worker(server.url, 0, 3, window__models=MODELS), \
                nats_worker(server.url, 1, 3, window__models=MODELS), \
                nats_worker(server.url, 2, 3, window__models=MODELS) as last:
            for s in range(5, 10):
                for e in envs:
                    await swarm.step(e, s, xs[(e, s)])
            assert await swarm.wait(lambda: len(swarm.live) >= len(xs), 60), len(swarm.live)
            assert all(len(v) == 1 for v in swarm.live.values())
            expected = check_actions(await swarm.stored_actions(), xs)
            assert await swarm.wait(swarm.drained, 10)
            merged, missing = await tnats.gather(cfg)
            assert missing == []
            assert sorted(merged["WORKERS"]) == ["w0", "w1", "w2"]
            assert merged["PARTITIONS"] == list(range(8))
            assert merged["STEPS"] == len(xs)
            assert merged["CONTRIBUTION"] == pytest.approx(expected, abs=1e-3)
            # the operators' one-liner: every share again, reset by the GET above
            peek = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "transports.nats", "peek", "--servers", server.url,
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(peek.communicate(), 30)
            assert peek.returncode == 0, err
            assert json.loads(out)["STEPS"] == 0
            assert last.poll() is None


async def test_sigkill_a_worker_mid_stream_loses_nothing_and_duplicates_nothing(server):
    await tnats.setup(config(server.url))
    envs = [f"env{i}" for i in range(30)]
    victim = {p for p in range(8) if p % 3 == 1}
    prey = [e for e in envs if tnats.partition_of(e, 8) in victim]
    assert prey
    xs = logits(np.random.default_rng(1), envs, 10)   # 300 steps
    keys = {"window__models": MODELS, "window__timeout_ms": 6000}
    async with Swarm(server.url) as swarm:
        with nats_worker(server.url, 0, 3, **keys), nats_worker(server.url, 2, 3, **keys):
            with nats_worker(server.url, 1, 3, **keys) as w1:
                for s in range(4):
                    for e in envs:
                        await swarm.step(e, s, xs[(e, s)])
                # step 4 of the victim's environments: two of three models, so the
                # victim holds open windows (unacknowledged messages) when it dies
                for e in envs:
                    await swarm.step(e, 4, xs[(e, 4)], models=[0, 1] if e in prey else None)
                assert await swarm.wait(lambda: held(swarm, victim, 2 * len(prey)), 30)
                w1.send_signal(signal.SIGKILL)
                w1.wait(10)
            for e in prey:
                await swarm.step(e, 4, xs[(e, 4)], models=[2])
            for s in range(5, 10):
                for e in envs:
                    await swarm.step(e, s, xs[(e, s)])
            with nats_worker(server.url, 1, 3, **keys) as again:
                assert await swarm.wait(lambda: len(swarm.live) >= len(xs), 60), \
                    (len(swarm.live), output(again)[-2000:])
                assert await swarm.wait(swarm.drained, 15)
                assert all(len(v) == 1 for v in swarm.live.values())
                # every model of the interrupted windows counted: the first two came back
                check_actions(await swarm.stored_actions(), xs)


async def test_a_standby_with_the_same_index_takes_the_partitions_over(server):
    """Two workers with one index: one pulls each partition (pinned), the other waits; when
    the puller is SIGKILLed, the standby takes over, and its open windows come back to it."""
    await tnats.setup(config(server.url, partitions=4))
    envs = [f"env{i}" for i in range(16)]
    xs = logits(np.random.default_rng(4), envs, 8)   # 128 steps
    keys = {"window__models": MODELS, "window__timeout_ms": 8000,
            "transport__nats__partitions": 4}
    async with Swarm(server.url) as swarm:
        with nats_worker(server.url, 0, 1, **keys) as standby:
            with nats_worker(server.url, 0, 1, **{**keys,
                                                  "transport__nats__worker_id": "w0b"}) as w:
                for s in range(4):
                    for e in envs:
                        await swarm.step(e, s, xs[(e, s)])
                assert await swarm.wait(lambda: len(swarm.live) >= 4 * len(envs), 30)
                for e in envs:
                    await swarm.step(e, 4, xs[(e, 4)], models=[0, 1])
                assert await swarm.wait(lambda: held(swarm, set(range(4)), 2 * len(envs)), 30)
                w.send_signal(signal.SIGKILL)
                w.wait(10)
            for e in envs:
                await swarm.step(e, 4, xs[(e, 4)], models=[2])
            for s in range(5, 8):
                for e in envs:
                    await swarm.step(e, s, xs[(e, s)])
            assert await swarm.wait(lambda: len(swarm.live) >= len(xs), 60), \
                (len(swarm.live), output(standby)[-2000:])
            assert await swarm.wait(swarm.drained, 15)
            assert all(len(v) == 1 for v in swarm.live.values())
            check_actions(await swarm.stored_actions(), xs)   # never split, never partial


async def test_nats_server_restart_mid_run_workers_reconnect(server):
    await tnats.setup(config(server.url))
    envs = [f"env{i}" for i in range(20)]
    xs = logits(np.random.default_rng(2), envs, 10)   # 200 steps
    keys = {"window__models": MODELS, "window__timeout_ms": 8000}

    async def stored() -> int:
        try:
            return (await swarm.js.stream_info("SWARM_ACTIONS")).state.messages
        except Exception:  # the server is coming back
            return -1

    async with Swarm(server.url) as swarm:
        with nats_worker(server.url, 0, 2, **keys) as w0, \
                nats_worker(server.url, 1, 2, **keys) as w1:
            for s in range(5):
                for e in envs:
                    await swarm.step(e, s, xs[(e, s)])
            for e in envs:   # open windows that live through the restart
                await swarm.step(e, 5, xs[(e, 5)], models=[0, 1])
            assert await swarm.wait(lambda: held(swarm, set(range(8)), 2 * len(envs)), 30)
            server.stop()
            server.start()
            for e in envs:
                await swarm.step(e, 5, xs[(e, 5)], models=[2])
            for s in range(6, 10):
                for e in envs:
                    await swarm.step(e, s, xs[(e, s)])
            assert await swarm.wait(lambda: _at_least(stored(), len(xs)), 60), \
                output(w0)[-2000:]
            assert await swarm.wait(swarm.drained, 15)
            check_actions(await swarm.stored_actions(), xs)
            assert w0.poll() is None and w1.poll() is None
            assert "reconnected" in output(w0) and "reconnected" in output(w1)


async def _at_least(value, n: int) -> bool:
    return await value >= n


async def test_bad_input_is_counted_acknowledged_and_valid_steps_keep_flowing(server):
    """The worker suite's bad-input cases, on NATS (step key inside each message)."""
    rng = np.random.default_rng(3)
    key = {"ENV_ID": "envB"}
    bad = [b"garbage", b"[1,2]", {"COMPONENT_ID": "a"},
           {"LOGITS": [1, "x"], "COMPONENT_ID": "a"},
           {"LOGITS": [1, None], "COMPONENT_ID": "a"},
           {"LOGITS": [1, 2], "COMPONENT_ID": "a", "DETERMINISTIC": "no"},
           {"LOGITS": [1, 2, 3, 4, 5, 6], "COMPONENT_ID": "zz"},   # shape in the window
           b"x" * 8192,                                             # over the size limit
           {"LOGITS": [1, 2], "COMPONENT_ID": "a", "STEP": None}]  # step key unusable
    reasons = ["not_json", "not_object", "missing_field", "bad_logits", "bad_logits",
               "bad_deterministic", "shape", "too_large", "bad_key"]
    mport = free_port()
    with nats_worker(server.url, 0, 1, window__models=2, metrics__port=mport,
                     limits__max_message_bytes=4096) as proc:
        async with Swarm(server.url) as swarm:
            assert await swarm.wait(lambda: _stream(swarm), 20)
            for i, b in enumerate(bad):
                x = rng.normal(0, 2, (2, 5)).astype(np.float32)
                p = {"LOGITS": x[0].tolist(), "COMPONENT_ID": "p", "DETERMINISTIC": True,
                     "STEP": i, **key}
                q = {**p, "LOGITS": x[1].tolist(), "COMPONENT_ID": "q"}
                await swarm.send("envB", p)
                await swarm.send("envB", b if isinstance(b, bytes) else {**key, "STEP": i, **b})
                await swarm.send("envB", p)
                await swarm.send("envB", q)
                assert await swarm.wait(lambda i=i: ("envB", i) in swarm.live, 20)
                assert swarm.live[("envB", i)][0]["ACTION"] == \
                    sum_probs(x[:, None, :])[1].tolist()
            for r in set(reasons):
                assert metric(mport, "swarm_aggregator_messages_rejected_total",
                              reason=r) == reasons.count(r), r
            assert metric(mport, "swarm_aggregator_messages_rejected_total",
                          reason="duplicate") == len(bad)
            assert await swarm.wait(swarm.drained, 10)   # rejected messages are settled too
        assert proc.poll() is None


async def test_a_line_break_in_a_step_key_adds_no_header_to_the_action(server):
    """The step key goes into the action's Nats-Msg-Id header: a peer's line break in it
    is a space there, as nats-py writes header values, not a header of the peer's."""
    step = "7\r\nNats-Expected-Stream: ELSEWHERE"
    async with Swarm(server.url) as swarm:
        with nats_worker(server.url, 0, 1, window__models=2) as w:
            assert await swarm.wait(lambda: _stream(swarm), 20)
            for m, x in (("p", [1.0, 0.0]), ("q", [2.0, 0.0])):
                await swarm.send("envN", {"LOGITS": x, "COMPONENT_ID": m, "ENV_ID": "envN",
                                          "STEP": step})
            assert await swarm.wait(lambda: ("envN", step) in swarm.live, 20), output(w)
            stored = await swarm.js.get_msg("SWARM_ACTIONS", 1)
            assert stored.headers["Nats-Msg-Id"] == f"envN|{step}".replace("\r\n", "  ")
            assert "ELSEWHERE" not in stored.headers.get("Nats-Expected-Stream", "")
            assert await swarm.wait(swarm.drained, 10)


async def _stream(swarm: Swarm) -> bool:
    try:
        await swarm.js.stream_info("SWARM_ACTIONS")
        return True
    except Exception:
        return False


async def test_a_message_past_max_deliver_goes_to_dead_letters(server):
    keys = {"window__models": 2, "window__timeout_ms": 60000, "transport__nats__partitions": 2,
            "transport__nats__max_deliver": 1, "transport__nats__ack_wait_s": 1.0}
    async with Swarm(server.url) as swarm:
        with nats_worker(server.url, 0, 1, **keys) as w:
            assert await swarm.wait(lambda: _stream(swarm), 20)
            await swarm.send("envD", {"LOGITS": [1.0, 0.0], "COMPONENT_ID": "m0",
                                      "ENV_ID": "envD", "STEP": 0})
            assert await swarm.wait(lambda: held(swarm, {0, 1}, 1), 20)
            w.send_signal(signal.SIGKILL)   # its only delivery was never settled
            w.wait(10)
        with nats_worker(server.url, 0, 1, **keys) as again:
            assert await swarm.wait(
                lambda: _at_least(_count(swarm, "SWARM_DEAD"), 1), 20), output(again)
            dead = await swarm.js.get_msg("SWARM_DEAD", 1)
            assert orjson.loads(dead.data)["COMPONENT_ID"] == "m0"
            assert dead.headers["Swarm-Subject"] == f"logits.{tnats.partition_of('envD', 2)}.envD"
            assert dead.headers["Swarm-Deliveries"] == "2"
            assert await swarm.wait(swarm.drained, 10)
            # and the partition goes on
            for m in ("m0", "m1"):
                await swarm.send("envD", {"LOGITS": [0.0, 1.0], "COMPONENT_ID": m,
                                          "ENV_ID": "envD", "STEP": 1, "DETERMINISTIC": True})
            assert await swarm.wait(lambda: ("envD", 1) in swarm.live, 20)
            assert swarm.live[("envD", 1)][0]["ACTION"] == [1]
        assert "dead letter" in output(again)


async def test_actions_refused_keep_their_logits_held_until_stored_once(server):
    """The action stream gone (deleted here; on a cluster, electing a leader): the worker's
    actions are refused (no responders) and sent again, their windows' messages stay
    unacknowledged; once the stream is back each action is stored once, and only then is
    every message acknowledged."""
    await tnats.setup(config(server.url, partitions=2))
    envs = [f"env{i}" for i in range(6)]
    xs = logits(np.random.default_rng(5), envs, 4)   # 24 steps
    later = {k: v for k, v in xs.items() if k[1] >= 1}
    keys = {"window__models": MODELS, "transport__nats__partitions": 2,
            "transport__nats__create": False}  # the operator makes the streams here
    async with Swarm(server.url) as swarm:
        with nats_worker(server.url, 0, 1, **keys) as w:
            for e in envs:
                await swarm.step(e, 0, xs[(e, 0)])
            assert await swarm.wait(lambda: len(swarm.live) >= len(envs), 30)
            await swarm.js.delete_stream("SWARM_ACTIONS")
            for s in range(1, 4):
                for e in envs:
                    await swarm.step(e, s, xs[(e, s)])
            # delivered and aggregated, the actions refused: nothing acknowledged
            assert await swarm.wait(lambda: held(swarm, {0, 1}, MODELS * len(later)), 30)
            await tnats.setup(config(server.url, partitions=2))
            assert await swarm.wait(lambda: _at_least(_count(swarm, "SWARM_ACTIONS"),
                                                      len(later)), 30), output(w)[-2000:]
            assert await swarm.wait(swarm.drained, 15)
            check_actions(await swarm.stored_actions(), later)
            assert w.poll() is None
            assert "action not stored" in output(w)


async def _count(swarm: Swarm, stream: str) -> int:
    try:
        return (await swarm.js.stream_info(stream)).state.messages
    except Exception:
        return -1


async def test_in_process_stop_hands_open_windows_back_at_once(server):
    """A clean stop NAKs what it holds: the next worker gets it without waiting ack_wait."""
    from processor.metrics import Metrics
    from processor.worker import Worker

    cfg = from_mapping({
        "transport": {"kind": "nats", "nats": {"servers": [server.url], "partitions": 2,
                                               "ack_wait_s": 30.0, "worker_id": "solo"}},
        "window": {"key": ["ENV_ID", "STEP"], "models": 2, "timeout_ms": 60000},
        "aggregate": {"deterministic": True}, "metrics": {"port": 0}})

    async def run_worker():
        transport = tnats.NatsTransport(cfg, lambda r, d: None)
        worker = Worker(cfg, transport, Metrics(CollectorRegistry()))
        stop, started = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(worker.run(stop, started))
        await asyncio.wait_for(started.wait(), 20)
        return transport, stop, task

    async with Swarm(server.url) as swarm:
        transport, stop, task = await run_worker()
        assert transport.ready and transport.stamp("action") is None
        await swarm.send("envS", {"LOGITS": [1.0, 0.0], "COMPONENT_ID": "a", "ENV_ID": "envS",
                                  "STEP": 0})
        assert await swarm.wait(lambda: held(swarm, {0, 1}, 1), 10)
        await swarm.nc.publish("evolution", b'{"CMD": "PEEK"}')
        assert await swarm.wait(lambda: swarm.replies, 10)
        reply = swarm.replies[0]
        assert (reply["WORKER"], reply["WORKERS"], reply["PARTITIONS"]) == ("solo", 1, [0, 1])
        stop.set()
        await asyncio.wait_for(task, 10)
        assert not transport.ready
        assert transport.counters()["handed_back"] == 1
        infos = await swarm.consumers()
        assert sum(c.num_pending + c.num_ack_pending for c in infos) == 1  # NAKed, not lost
        transport, stop, task = await run_worker()
        await swarm.send("envS", {"LOGITS": [0.0, 3.0], "COMPONENT_ID": "b", "ENV_ID": "envS",
                                  "STEP": 0})
        assert await swarm.wait(lambda: ("envS", 0) in swarm.live, 10)   # << ack_wait_s
        assert swarm.live[("envS", 0)][0]["ACTION"] == [1]
        assert "PARTIAL" not in swarm.live[("envS", 0)][0]
        stop.set()
        await asyncio.wait_for(task, 10)
        assert transport.counters()["redelivery"] == 1
        assert await swarm.drained()


async def test_evolution_messages_past_the_pending_limit_are_dropped(monkeypatch):
    """Evolution commands (WEIGHTS can be large) wait for the worker up to a byte limit, as
    nats-py's subscription would hold them; past it they are dropped (core NATS,
    at-most-once), and taken again once the worker has read what waits."""
    import transports.nats.transport as transport

    monkeypatch.setattr(transport, "EVOLUTION_PENDING_BYTES", 1000)
    t = tnats.NatsTransport(config("nats://127.0.0.1:4222"), lambda r, d: None)
    for body in (b"a" * 400, b"b" * 400, b"c" * 400):
        t._on_evolution(b"evolution", b"", body, None)
    assert [e[1][:1] for e in await t.receive(0)] == [b"a", b"b"]
    t._on_evolution(b"evolution", b"", b"d" * 900, None)
    assert [e[1][:1] for e in await t.receive(0)] == [b"d"]


@pytest.mark.parametrize("chunk", [1, 7, 64, 100_000])
async def test_the_parser_hands_whole_messages_over_however_the_reads_cut_them(chunk):
    """MSG and HMSG (with and without reply subject and headers, a large one among them)
    reach the direct handler byte for byte, each as soon as its last byte is read, whatever
    the reads' boundaries; +OK between them goes through nats-py's own parse."""
    nc = tnats.FastClient()
    got: list[tuple[bytes, bytes, bytes, bytes | None]] = []
    nc._direct[7] = lambda subject, reply, data, headers: got.append(
        (subject, reply, data, headers))
    head = b"NATS/1.0\r\nNats-Msg-Id: a|1\r\n\r\n"
    big = bytes(range(256)) * 400
    sent = [(b"logits.1.e", b"$JS.ACK.S.part-1.1.5.5.17.0", b'{"x": 1}', head),
            (b"evolution", b"", big, None),
            (b"_INBOX.x.ack.3", b"", b'{"stream":"A","seq":9}', None),
            (b"logits.2.e", b"", b"", head)]
    wire = b""
    ends = []  # where each message's bytes end on the wire
    for subject, reply, data, headers in sent:
        if headers is None:
            wire += b"MSG %s 7 %s%d\r\n%s\r\n" % (subject, reply + b" " if reply else b"",
                                                    len(data), data)
        else:
            wire += b"HMSG %s 7 %s%d %d\r\n%s%s\r\n" % (
                subject, reply + b" " if reply else b"", len(headers),
                len(headers) + len(data), headers, data)
        ends.append(len(wire))
        wire += b"+OK\r\n"
    for i in range(0, len(wire), chunk):
        await nc._ps.parse(wire[i:i + chunk])
        assert len(got) == sum(1 for e in ends if e <= i + chunk)
    assert got == sent
    assert not nc._ps.buf


@pytest.mark.parametrize(("keys", "bad"), [
    ({"transport": {"nats": {"servers": ["nats://u:secret@h:4222"]}}}, "transport.nats.servers"),
    ({"window": {"timeout_ms": 0}}, "window.timeout_ms"),
    ({"window": {"key": []}}, "window.key"),
    ({"transport": {"nats": {"workers": 9}}}, "transport.nats.workers"),
    ({"topics": {"logits": "logits.*"}}, "topics.logits"),
    ({"transport": {"nats": {"storage": "disk"}}}, "transport.nats.storage"),
    ({"transport": {"nats": {"stream": "a.b"}}}, "transport.nats.stream"),
])
def test_config_on_nats_is_checked(keys, bad):
    base = {"transport": {"kind": "nats"}, "window": {"key": ["ENV_ID", "STEP"]}}
    data = {k: {**base.get(k, {}), **v} for k, v in keys.items()}
    if "transport" in data:
        data["transport"]["kind"] = "nats"
    with pytest.raises(ConfigError) as e:
        from_mapping({**base, **data})
    assert e.value.key == bad


def test_merge_replies_sums_the_shares():
    merged = tnats.merge_replies([
        {"WORKER": "a", "PARTITIONS": [0, 2], "STEPS": 10, "CONTRIBUTION": {"m": 4.0, "n": 6.0},
         "AGREEMENT": {"m": 0.5}, "MISSED": {"m": 1}},
        {"WORKER": "b", "PARTITIONS": [1], "STEPS": 30, "CONTRIBUTION": {"m": 10.0},
         "AGREEMENT": {"m": 1.0}, "MISSED": {"m": 2, "n": 1}}])
    assert merged["CONTRIBUTION"] == {"m": 14.0, "n": 6.0}
    assert merged["STEPS"] == 40 and merged["PARTITIONS"] == [0, 1, 2]
    assert merged["MISSED"] == {"m": 3, "n": 1}
    assert merged["AGREEMENT"]["m"] == pytest.approx(0.875)


async def test_user_and_password_are_passed_and_never_logged(tmp_path, caplog):
    from tests.nats_helpers import NatsServer
    from transports import create

    srv = NatsServer(tmp_path / "js", "--user", "swarm", "--pass", "s3cret-pw").start()
    try:
        good = config(srv.url, user="swarm", password="s3cret-pw", connect_wait_s=3.0)
        assert "s3cret-pw" not in repr(good) and "s3cret-pw" not in good.describe()
        t = create(good)
        async with t:
            assert t.ready
        bad = config(srv.url, user="swarm", password="wrong-pw", connect_wait_s=2.0)
        with pytest.raises(Exception):  # noqa: B017 - refused, whatever nats-py calls it
            async with create(bad):
                pass
        assert "s3cret-pw" not in caplog.text and "wrong-pw" not in caplog.text
    finally:
        srv.stop()
