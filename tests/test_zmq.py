"""ZeroMQ end to end: the worker as a real process, real sockets on loopback."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request

import numpy as np
import orjson
import pytest

from processor.client import Swarm
from processor.messages import encode_binary, pack
from tests.procs import cli, free_port, metric, output, process, wait_for, worker_env, zmq_swarm
from tests.reference import sum_probs

pytestmark = pytest.mark.timeout(90)


def run_steps(swarm: Swarm, rng, steps: int, models: int, actions: int = 6) -> dict:
    """Lockstep steps; checks each action; returns the expected contribution."""
    expected: dict[str, float] = {}
    env = swarm.environment()
    peers = [swarm.model(f"m{m}", deterministic=True) for m in range(models)]
    for _ in range(steps):
        x = rng.normal(0, 2, (models, actions)).astype(np.float32)
        for m, model in enumerate(peers):
            model.send(x[m])
        out = env.wait(timeout=5)  # lockstep: the next action
        _, action, credit = sum_probs(x[:, None, :])
        assert out["ACTION"] == action.tolist()
        for m in range(models):
            expected[f"m{m}"] = expected.get(f"m{m}", 0.0) + float(credit[m, 0])
    return expected


def test_worker_over_zmq_serves_steps_and_get_and_stops_on_sigterm():
    sub, pub, mport = free_port(), free_port(), free_port()
    env = worker_env(transport__zmq__sub=f"tcp://127.0.0.1:{sub}",
                     transport__zmq__pub=f"tcp://127.0.0.1:{pub}",
                     window__models=5, window__timeout_ms=0, metrics__port=mport)
    with process(cli("run"), env) as proc:
        peer = zmq_swarm(sub, pub)
        try:
            evolution = peer.evolution()
            assert evolution.get()["CONTRIBUTION"] == {}
            expected = run_steps(peer, np.random.default_rng(0), 200, 5)
            reply = evolution.get()
            assert reply["CONTRIBUTION"] == pytest.approx(expected, abs=1e-4)
            # metrics beside it
            base = f"http://127.0.0.1:{mport}"
            text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
            assert "swarm_aggregator_actions_published_total 200.0" in text
            assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
            assert urllib.request.urlopen(base + "/readyz", timeout=5).status == 200
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(base + "/nothing", timeout=5)
        finally:
            peer.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # bounded, not timed: the machine may be busy
        log = output(proc)
    assert "transport=zmq" in log and f"127.0.0.1:{sub}" in log  # the start-up line


def test_bad_frames_do_not_stop_the_worker():
    sub, pub = free_port(), free_port()
    env = worker_env(transport__zmq__sub=f"tcp://127.0.0.1:{sub}",
                     transport__zmq__pub=f"tcp://127.0.0.1:{pub}",
                     window__models=2, window__timeout_ms=0, metrics__port=0)
    with process(cli("run"), env) as proc:
        peer = zmq_swarm(sub, pub)
        try:
            peer.publish("logits", [b"{}", b"third frame"])
            peer.publish("logits", [])   # the topic frame alone
            peer.publish("logits", b"\x01\x02not json")  # (a zero byte first: packed)
            peer.publish("logits", {"LOGITS": [None, 1.0], "COMPONENT_ID": "x"})
            peer.publish("logitsXL", {"LOGITS": [1, 2], "COMPONENT_ID": "x"})  # not our topic
            run_steps(peer, np.random.default_rng(1), 20, 2)
        finally:
            peer.close()
        assert proc.poll() is None
    out = output(proc)
    assert "reason=bad_frame" in out and "reason=not_json" in out


def test_through_the_proxy_many_to_many():
    xsub, xpub = free_port(), free_port()
    env = worker_env(transport__zmq__sub=f"tcp://127.0.0.1:{xpub}",
                     transport__zmq__sub_bind=False,
                     transport__zmq__pub=f"tcp://127.0.0.1:{xsub}",
                     transport__zmq__pub_bind=False,
                     window__models=3, window__key=["ENV_ID", "STEP"], window__timeout_ms=0,
                     metrics__port=0)
    proxy_argv = cli("proxy", "--xsub", f"tcp://127.0.0.1:{xsub}",
                     "--xpub", f"tcp://127.0.0.1:{xpub}")
    with process(proxy_argv) as proxy, process(cli("run"), env):
        # two environments on their own sockets, both through the proxy
        peers = [zmq_swarm(xsub, xpub, key=["ENV_ID", "STEP"]) for _ in range(2)]
        try:
            rng = np.random.default_rng(2)
            for step in range(50):
                xs = [rng.normal(0, 2, (3, 4)).astype(np.float32) for _ in peers]
                for m in range(3):
                    for e, p in enumerate(peers):
                        p.model(m, deterministic=True).send(xs[e][m], (f"env{e}", step))
                for e, p in enumerate(peers):
                    # every subscriber sees every action; each waits for its own step key
                    mine = p.environment().wait((f"env{e}", step), timeout=5)
                    assert mine["ACTION"] == sum_probs(xs[e][:, None, :])[1].tolist()
        finally:
            for p in peers:
                p.close()
        assert proxy.poll() is None


def test_binary_logits_frames():
    sub, pub, mport = free_port(), free_port(), free_port()
    env = worker_env(transport__zmq__sub=f"tcp://127.0.0.1:{sub}",
                     transport__zmq__pub=f"tcp://127.0.0.1:{pub}",
                     window__models=3, window__key=["STEP"], window__timeout_ms=0,
                     metrics__port=mport)
    with process(cli("run"), env):
        peer = zmq_swarm(sub, pub, key=["STEP"])
        try:
            env = peer.environment()
            models = [peer.model(f"m{m}", binary=True, deterministic=True) for m in range(3)]
            rng = np.random.default_rng(5)
            for step, batch in enumerate([None, 4, None, 2] * 10):
                shape = (3, 7) if batch is None else (3, batch, 7)
                x = rng.normal(0, 2, shape).astype(np.float32)
                nan = np.array([np.nan, 1], "<f4").tobytes()
                bad = [[b"{}", b"\x00\x00\x80"],                                # not float32s
                       [orjson.dumps({"COMPONENT_ID": "z", "STEP": step, "SHAPE": [5, 5]}),
                        x[0].tobytes()],                                        # SHAPE lies
                       [b'{"COMPONENT_ID": "z", "STEP": -1}', nan],             # NaN
                       pack(b'{"COMPONENT_ID": "z", "STEP": -1}', nan)[:20],    # header cut
                       pack(b'{"COMPONENT_ID": "z", "STEP": -1}', nan)]         # NaN, packed
                for m, model in enumerate(models):
                    if m == 1:
                        peer.publish("logits", bad[step % 5])
                    if m == 2 and step % 2:  # the same logits in three frames: one window
                        obj = {"COMPONENT_ID": "m2", "STEP": step, "DETERMINISTIC": True}
                        peer.publish("logits", encode_binary(obj, x[m]))
                    else:
                        model.send(x[m], step)   # [b"logits", packed JSON and values]
                out = env.wait(step, timeout=5)
                stack = x[:, None, :] if batch is None else x
                assert out["STEP"] == step
                assert out["ACTION"] == sum_probs(stack)[1].tolist()
            peer.publish("logits", [b"{}", b"", b"four"])
            wait_for(lambda: metric(mport, "swarm_aggregator_messages_rejected_total",
                                    reason="bad_frame") >= 1, timeout=30,
                     what="the bad frame counted")
        finally:
            peer.close()
        rejected = {r: metric(mport, "swarm_aggregator_messages_rejected_total", reason=r)
                    for r in ("bad_logits", "non_finite", "bad_frame")}
    assert rejected["bad_logits"] == 24 and rejected["non_finite"] == 16
    assert rejected["bad_frame"] == 1


def test_the_transport_spins_only_while_messages_follow_each_other_closely():
    """transport.zmq.spin_us: a lockstep worker polls instead of sleeping while the next
    message keeps coming within spin_us; once the gaps grow (an idle bus, slow
    environments) it stops, so an idle worker burns no CPU; spin_us = 0 never spins."""
    import asyncio
    import threading

    import zmq

    from processor.config import from_mapping
    from transports.zeromq import SPIN_MEMORY, ZmqTransport

    async def scenario(spin_us: int) -> list[bool]:
        cfg = from_mapping({"transport": {"zmq": {"sub": "tcp://127.0.0.1:0",
                                                  "pub": "tcp://127.0.0.1:0",
                                                  "spin_us": spin_us}}})
        seen: list[bool] = []
        async with ZmqTransport(cfg, lambda reason, detail: None) as t:
            seen.append(t.spinning)               # no history yet
            for _ in range(SPIN_MEMORY):          # nothing comes: every wait is long
                assert await t.receive(0.005) == []
            seen.append(t.spinning)
            # A peer that sends every millisecond: each wait ends well within 100 ms.
            stop = threading.Event()

            def peer() -> None:
                pub = zmq.Context.instance().socket(zmq.PUB)
                pub.connect(t.sub_endpoint)
                while not stop.wait(0.001):
                    pub.send_multipart([b"logits", b"{}"])
                pub.close(0)

            thread = threading.Thread(target=peer)
            thread.start()
            try:
                got = 0
                for _ in range(2000):
                    got += len(await t.receive(1.0))
                    if t.spinning and got > SPIN_MEMORY:
                        break
                seen.append(t.spinning)
            finally:
                stop.set()
                thread.join(10)
        return seen

    assert asyncio.run(scenario(100_000)) == [True, False, True]
    assert asyncio.run(scenario(0)) == [False, False, False]
