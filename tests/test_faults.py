"""Faults on ZeroMQ: a model dies, the proxy restarts, a flood, SIGTERM mid-run, huge frames."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import zmq

from tests.procs import (
    ZmqPeer,
    cli,
    free_port,
    metric,
    output,
    process,
    rss_mb,
    wait_for,
    worker_env,
)
from tests.reference import sum_probs

pytestmark = pytest.mark.timeout(120)


class Worker:
    """The worker as a process on loopback, bound SUB and PUB, with metrics."""

    def __init__(self, **keys):
        self.sub, self.pub, self.mport = free_port(), free_port(), free_port()
        self.env = worker_env(transport__zmq__sub=f"tcp://127.0.0.1:{self.sub}",
                              transport__zmq__pub=f"tcp://127.0.0.1:{self.pub}",
                              metrics__port=self.mport, **keys)

    def peer(self) -> ZmqPeer:
        p = ZmqPeer(f"tcp://127.0.0.1:{self.sub}", f"tcp://127.0.0.1:{self.pub}")
        p.handshake()
        return p

    def metric(self, name, **labels):
        return metric(self.mport, name, **labels)


def test_a_dead_model_leaves_partial_actions_on_the_deadline():
    w = Worker(window__models=3, window__key=["STEP"], window__timeout_ms=150,
               window__min_models=2)
    with process(cli("run"), w.env):
        peer = w.peer()
        try:
            rng = np.random.default_rng(0)
            for step in range(30):
                alive = 3 if step < 20 else 2          # m2 dies after step 19
                x = rng.normal(0, 2, (3, 5)).astype(np.float32)
                for m in range(alive):
                    peer.send("logits", {"LOGITS": x[m].tolist(), "COMPONENT_ID": f"m{m}",
                                         "DETERMINISTIC": True, "STEP": step})
                out = peer.recv("action", 3)
                assert out["STEP"] == step
                assert out["ACTION"] == sum_probs(x[:alive, None, :])[1].tolist()
                if step < 20:
                    assert "PARTIAL" not in out
                else:
                    assert out["PARTIAL"] is True and out["MODELS"] == 2
            assert w.metric("swarm_aggregator_windows_closed_total", outcome="partial") == 10
            peer.send("evolution", {"CMD": "GET"})
            assert peer.recv("evolution")["MISSED"] == {"m2": 10}
        finally:
            peer.close()


def test_the_proxy_restarts_and_the_pipeline_recovers():
    xsub, xpub = free_port(), free_port()
    env = worker_env(transport__zmq__sub=f"tcp://127.0.0.1:{xpub}",
                     transport__zmq__sub_bind=False,
                     transport__zmq__pub=f"tcp://127.0.0.1:{xsub}",
                     transport__zmq__pub_bind=False,
                     window__models=2, window__key=["STEP"], window__timeout_ms=500,
                     metrics__port=0)
    proxy_argv = cli("proxy", "--xsub", f"tcp://127.0.0.1:{xsub}",
                     "--xpub", f"tcp://127.0.0.1:{xpub}")
    addr = (f"tcp://127.0.0.1:{xsub}", f"tcp://127.0.0.1:{xpub}")

    def steps(peer, first, n):
        for step in range(first, first + n):
            for m, row in enumerate([[2.0, 0.0], [1.0, 0.0]]):
                peer.send("logits", {"LOGITS": row, "COMPONENT_ID": m, "STEP": step,
                                     "DETERMINISTIC": True})
            out = peer.recv("action", 3)
            assert out is not None and out["STEP"] == step and out["ACTION"] == [0]

    with process(cli("run"), env) as worker:
        with process(proxy_argv):
            peer = ZmqPeer(*addr)
            peer.handshake()
            steps(peer, 0, 20)
        # the proxy is gone: nothing flows; the worker keeps running
        assert worker.poll() is None
        with process(proxy_argv):
            peer.handshake(timeout=30)   # every connect-side socket reconnects by itself
            steps(peer, 100, 20)
            peer.close()
        assert worker.poll() is None


def test_a_flood_keeps_memory_bounded_by_the_window_cap():
    """Two equal floods of one-model windows: every message accounted for (evicted or
    open), open windows within the cap, and the second flood leaves the worker no bigger.

    Nothing here depends on timing: queues are unbounded on both sides (no high-water-mark
    drops), and after each chunk a valid step's action says the worker has read it all
    (ZeroMQ keeps the order of one connection), so queues never hold more than a chunk.
    """
    w = Worker(window__models=2, window__key=["STEP"], window__timeout_ms=0,
               window__max_open=500, window__min_models=2, window__late_memory=1000,
               transport__zmq__rcvhwm=0)
    with process(cli("run"), w.env) as proc:
        peer = w.peer()
        peer.pub.close(0)
        peer.pub = peer.ctx.socket(zmq.PUB)
        peer.pub.setsockopt(zmq.SNDHWM, 0)
        peer.pub.connect(f"tcp://127.0.0.1:{w.sub}")
        peer.handshake()
        try:
            body = b'{"LOGITS": [0.5, 0.1, 0.3], "COMPONENT_ID": "half", "STEP": %d}'
            sent = barriers = 0

            def barrier() -> None:
                nonlocal barriers
                barriers += 1
                step = -barriers
                for m in ("a", "b"):
                    peer.send("logits", {"LOGITS": [1, 0, 0], "COMPONENT_ID": m,
                                         "STEP": step, "DETERMINISTIC": True})
                out = peer.recv("action", 60)
                while out is not None and out.get("STEP") != step:
                    out = peer.recv("action", 60)
                assert out == {"ACTION": [0], "STEP": step}

            def flood(n: int) -> None:
                nonlocal sent
                for _ in range(n // 10_000):
                    for _ in range(10_000):
                        peer.pub.send_multipart([b"logits", body % sent])
                        sent += 1
                    barrier()

            flood(100_000)
            before = rss_mb(proc.pid)
            flood(100_000)
            after = rss_mb(proc.pid)
            got = w.metric("swarm_aggregator_messages_received_total", topic="logits")
            evicted = w.metric("swarm_aggregator_windows_closed_total", outcome="evicted")
            open_now = w.metric("swarm_aggregator_open_windows")
            assert got == sent + 2 * barriers  # no drops anywhere
            # every flood message opened a window: evicted (counted) or still open
            assert evicted + open_now == sent
            assert open_now <= 500
            assert after - before < 40, (before, after)  # twice the windows, no growth
        finally:
            peer.close()


def test_sigterm_mid_run_publishes_open_windows_and_exits_zero():
    w = Worker(window__models=3, window__key=["STEP"], window__timeout_ms=0,
               window__min_models=2)
    with process(cli("run"), w.env) as proc:
        peer = w.peer()
        try:
            for step in range(5):
                for m in range(2):  # two of three models: the windows stay open
                    peer.send("logits", {"LOGITS": [0.0, 1.0], "COMPONENT_ID": m,
                                         "STEP": step, "DETERMINISTIC": True})
            assert wait_for(lambda: w.metric("swarm_aggregator_open_windows") == 5)
            proc.send_signal(signal.SIGTERM)
            got = [peer.recv("action", 30) for _ in range(5)]
            assert proc.wait(30) == 0  # bounded, not timed: the machine may be busy
        finally:
            peer.close()
    assert sorted(g["STEP"] for g in got) == [0, 1, 2, 3, 4]
    assert all(g["PARTIAL"] and g["MODELS"] == 2 and g["ACTION"] == [1] for g in got)
    assert "stopped after 5 actions" in output(proc)


def test_a_64_mib_message_is_counted_and_the_worker_goes_on():
    w = Worker(window__models=1, window__timeout_ms=0)   # default limit: 16 MiB
    with process(cli("run"), w.env) as proc:
        peer = w.peer()
        try:
            peer.pub.send_multipart([b"logits", b"[" + b"1," * (32 << 20) + b"1]"])
            assert wait_for(lambda: w.metric("swarm_aggregator_messages_rejected_total",
                                             reason="too_large") == 1, 30)
            peer.send("logits", {"LOGITS": [0, 1], "COMPONENT_ID": "a", "DETERMINISTIC": True})
            assert peer.recv("action")["ACTION"] == [1]
            assert rss_mb(proc.pid) < 1000
        finally:
            peer.close()
