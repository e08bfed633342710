"""A peer that invents COMPONENT_IDs without end: the worker serves on, its state bounded.

The worker runs in this process on the real ZeroMQ transport (so its internal state can be
read), the peer on real sockets. 200,000 distinct ids arrive, two per window, between
steps of two regular models whose actions and credits are checked. The regular models
send at least once per limits.max_models new ids, so they keep their places in the ledger
(the documented rule: the least recently credited model gives up its place). Before the bound,
~65,600 ids ended the worker (a metrics label lookup), and its known models, ledger and
label memory grew with every id.
"""

from __future__ import annotations

import asyncio
import os
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from processor.config import from_mapping
from processor.metrics import OVERFLOW_MEMORY, Metrics
from processor.worker import Worker
from tests.procs import free_port, rss_mb, zmq_swarm
from tests.reference import sum_probs
from transports import create

pytestmark = pytest.mark.timeout(240)

IDS = 200_000
CHUNK = 500          # new ids between two steps of the regular models (< MAX_MODELS)
MAX_MODELS = 1024
LABELS = 50


class InProcessWorker:
    """The worker on its own event loop in a thread, bound on loopback ports."""

    def __init__(self, **sections) -> None:
        self.sub, self.pub = free_port(), free_port()
        self.cfg = from_mapping({
            "transport": {"kind": "zmq", "zmq": {"sub": f"tcp://127.0.0.1:{self.sub}",
                                                 "pub": f"tcp://127.0.0.1:{self.pub}"}},
            "metrics": {"port": 0, "max_models": LABELS}, **sections})
        self.metrics = Metrics(CollectorRegistry(), max_models=LABELS)
        self.worker = Worker(self.cfg, create(self.cfg), self.metrics)
        self.error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self.worker.run(self._stop))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def __enter__(self) -> InProcessWorker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()


def test_two_hundred_thousand_ids_leave_the_worker_serving_with_bounded_state():
    rng = np.random.default_rng(11)
    with InProcessWorker(window={"models": 2, "key": ["STEP"], "timeout_ms": 0},
                         limits={"max_models": MAX_MODELS}) as w:
        # Unbounded queues: no action of the regular models is dropped among the flood's.
        peer = zmq_swarm(w.sub, w.pub, key=["STEP"], hwm=0)
        try:
            env = peer.environment()
            a, b = peer.model("a", deterministic=True), peer.model("b", deterministic=True)
            credit = {"a": 0.0, "b": 0.0}
            rss = []
            sent = step = 0
            while sent < IDS:
                # the flood: windows of two new ids each, complete at once, published
                for i in range(sent, sent + CHUNK, 2):
                    x = rng.normal(0, 1, 4).tolist()
                    for j in (i, i + 1):
                        peer.model(f"id{j}", deterministic=True).send(x, f"s{i}")
                sent += CHUNK
                # a regular step; its action also says the flood before it was handled
                x = rng.normal(0, 2, (2, 6)).astype(np.float32)
                a.send(x[0], step)
                b.send(x[1], step)
                out = env.wait(step, timeout=60)
                _, action, c = sum_probs(x[:, None, :])
                assert out == {"ACTION": action.tolist(), "STEP": step}
                credit["a"] += float(c[0, 0])
                credit["b"] += float(c[1, 0])
                step += 1
                assert w.error is None and w._thread.is_alive()
                if sent % 20_000 == 0:
                    rss.append(rss_mb(os.getpid()))
                # bounded state, whatever came before, read once the worker is done with
                # the step: its books follow the action (a PEEK is answered after them)
                peer.evolution().peek(timeout=60)
                wk, led, met = w.worker, w.worker.ledger, w.metrics
                assert len(wk.known) <= 2
                assert len(led.names) <= MAX_MODELS and len(led.missed) <= MAX_MODELS
                assert len(met._labels) <= LABELS
                assert len(met._overflow) <= OVERFLOW_MEMORY
                assert len(met.contribution.values) <= LABELS + 1
                assert len(wk.windows) <= wk.cfg.window.max_open
                assert len(wk.windows.closed_keys) <= wk.cfg.window.late_memory
            reply = peer.evolution().get(timeout=60, request_id="r1")
        finally:
            peer.close()
    assert w.error is None
    windows = IDS // 2 + step
    assert reply["STEPS"] == windows
    # The regular models were credited every step: they kept their places in the ledger.
    assert reply["CONTRIBUTION"]["a"] == pytest.approx(credit["a"], abs=1e-6)
    assert reply["CONTRIBUTION"]["b"] == pytest.approx(credit["b"], abs=1e-6)
    assert len(reply["CONTRIBUTION"]) <= MAX_MODELS
    # What the invented ids had moved to the overflow: the books still balance.
    total = sum(reply["CONTRIBUTION"].values()) + reply["OVERFLOW"]["CONTRIBUTION"]
    assert total == pytest.approx(windows, rel=1e-9)
    assert reply["OVERFLOW"]["MODELS"] >= IDS - MAX_MODELS
    # Each invented id beyond the label cap counted once under model="other".
    overflow = w.metrics.registry.get_sample_value(
        "swarm_aggregator_model_label_overflow_total")
    assert overflow == IDS + 2 - LABELS
    # Memory: the second half of the ids costs nothing that stays. (ZeroMQ's and the
    # allocator's pools are warm after the first chunks; the bound is loose on purpose.)
    half = len(rss) // 2
    assert rss[-1] - rss[half - 1] < 32, rss
