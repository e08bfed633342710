"""One contract, every transport: what the worker must do whichever bus it sits on.

`TransportContract` holds the tests; each subclass supplies only the config of its
transport (and the server it needs, from tests/conftest.py), as Kombu runs one functional
suite against each broker. The worker runs in the test's event loop on the real transport;
the peers are processor.client's, on the same transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from processor.client import AsyncSwarm, connect_async
from processor.config import Config, from_mapping
from processor.metrics import Metrics
from processor.worker import Worker
from tests.procs import free_port
from tests.reference import sum_probs
from transports import create

pytestmark = pytest.mark.timeout(120)

MODELS = 3
LIMIT = 4096  # limits.max_message_bytes


@dataclass
class Running:
    worker: Worker
    swarm: AsyncSwarm
    stop: asyncio.Event
    task: asyncio.Task[None]

    def counted(self, name: str, **labels: str) -> float:
        value = self.worker.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def sections(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "window": {"models": MODELS, "key": ["ENV_ID", "STEP"], "timeout_ms": 400},
        "limits": {"max_message_bytes": LIMIT},
        "metrics": {"port": 0},
    }
    for k, v in extra.items():
        base[k] = {**base.get(k, {}), **v}
    return base


def logits(rng: np.random.Generator, actions: int = 5) -> np.ndarray:
    return rng.normal(0, 2, (MODELS, actions)).astype(np.float32)


class TransportContract:
    """What every transport must let the worker do. Subclasses define `config`."""

    @pytest.fixture
    def config(self) -> Config:
        raise NotImplementedError

    @pytest.fixture
    async def running(self, config: Config) -> AsyncIterator[Running]:
        w = await start(config)
        try:
            async with connect_async(config) as swarm:
                await swarm.environment()
                await swarm.ready(timeout=60)
                yield Running(w.worker, swarm, w.stop, w.task)
        finally:
            w.stop.set()
            await asyncio.wait_for(w.task, 60)

    async def send_step(self, swarm: AsyncSwarm, x: np.ndarray, env: str, step: int,
                        models: int = MODELS) -> None:
        for m in range(models):
            await swarm.model(f"m{m}", deterministic=True).send(
                x[m].tolist(), {"ENV_ID": env, "STEP": step})

    async def test_delivers_logits_and_publishes_actions(self, running: Running) -> None:
        rng = np.random.default_rng(1)
        env = await running.swarm.environment()
        for step in range(5):
            x = logits(rng)
            await self.send_step(running.swarm, x, "e1", step)
            out = await env.wait({"ENV_ID": "e1", "STEP": step}, timeout=30)
            assert out["ACTION"] == sum_probs(x[:, None, :])[1].tolist()
            assert "PARTIAL" not in out
        assert running.counted("swarm_aggregator_windows_closed_total",
                               outcome="complete") == 5

    async def test_a_window_short_of_models_closes_partial_at_its_deadline(
            self, running: Running) -> None:
        rng = np.random.default_rng(2)
        x = logits(rng)
        await self.send_step(running.swarm, x, "e2", 0, models=MODELS - 1)
        out = await (await running.swarm.environment()).wait({"ENV_ID": "e2", "STEP": 0},
                                                             timeout=30)
        assert out["PARTIAL"] is True and out["MODELS"] == MODELS - 1
        assert out["ACTION"] == sum_probs(x[:MODELS - 1, None, :])[1].tolist()

    async def test_answers_evolution_commands(self, running: Running) -> None:
        rng = np.random.default_rng(3)
        env = await running.swarm.environment()
        evo = await running.swarm.evolution()
        x = logits(rng)
        await self.send_step(running.swarm, x, "e3", 0)
        await env.wait({"ENV_ID": "e3", "STEP": 0}, timeout=30)
        _, _, credit = sum_probs(x[:, None, :])
        peek = await evo.peek()
        assert peek["STEPS"] == 1
        report = await evo.get(request_id="r-1")
        assert report["CONTRIBUTION"] == pytest.approx(
            {f"m{m}": float(credit[m, 0]) for m in range(MODELS)}, abs=1e-6)
        again = await evo.get(request_id="r-1")      # a lost reply asked for again
        assert again["CONTRIBUTION"] == report["CONTRIBUTION"]
        assert (await evo.peek())["STEPS"] == 0     # one reset, not two
        weights = await evo.set_model_weights({"m0": 2.0})
        assert weights["MODEL_WEIGHTS"]["m0"] == 2.0
        for cmd in ("GET", "PEEK", "SET_MODEL_WEIGHTS"):
            assert running.counted("swarm_aggregator_evolution_requests_total", cmd=cmd) >= 1

    async def test_rejects_oversize_input_and_serves_on(self, running: Running) -> None:
        # (an object: the client stamps it as its transport wants, TO_ROOM on swergio)
        big = {"CMD": "GET", "PAD": "x" * (2 * LIMIT)}
        await running.swarm.publish(running.worker.cfg.topics.evolution, big)
        rng = np.random.default_rng(4)
        x = logits(rng)
        await self.send_step(running.swarm, x, "e4", 0)
        out = await (await running.swarm.environment()).wait({"ENV_ID": "e4", "STEP": 0},
                                                             timeout=30)
        assert out["ACTION"] == sum_probs(x[:, None, :])[1].tolist()
        assert running.counted("swarm_aggregator_messages_rejected_total",
                               reason="too_large") == 1

    async def test_reports_readiness(self, running: Running) -> None:
        assert running.worker.transport.ready
        assert running.counted("swarm_aggregator_transport_ready") == 1

    async def test_stops_cleanly(self, config: Config) -> None:
        """A stop with a window open: published with its quorum where delivery is
        at-most-once; handed back where the transport acknowledges, so that the next
        worker completes the window with nothing lost."""
        rng = np.random.default_rng(5)
        x = logits(rng)
        key = {"ENV_ID": "e5", "STEP": 0}
        async with connect_async(config) as swarm:
            env = await swarm.environment()
            first = await start(config)
            await swarm.ready(timeout=60)
            await self.send_step(swarm, x, "e5", 0, models=MODELS - 1)
            await until(lambda: len(first.worker.windows) == 1)
            first.stop.set()
            await asyncio.wait_for(first.task, 60)
            assert first.task.exception() is None
            assert not first.worker.transport.ready
            if not first.worker.acks:
                out = await env.wait(key, timeout=30)
                assert out["PARTIAL"] is True and out["MODELS"] == MODELS - 1
                return
            assert first.worker.transport.handed_back == MODELS - 1
            second = await start(config)
            try:
                await swarm.model(f"m{MODELS - 1}", deterministic=True).send(
                    x[MODELS - 1].tolist(), key)
                out = await env.wait(key, timeout=60)
                assert "PARTIAL" not in out
                assert out["ACTION"] == sum_probs(x[:, None, :])[1].tolist()
            finally:
                second.stop.set()
                await asyncio.wait_for(second.task, 60)


@dataclass
class Started:
    worker: Worker
    stop: asyncio.Event
    task: asyncio.Task[None]


async def start(config: Config) -> Started:
    """A worker on the config's transport, in this event loop, serving."""
    worker = Worker(config, create(config), Metrics(CollectorRegistry()))
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(worker.run(stop, started))
    done, _ = await asyncio.wait([task, asyncio.create_task(started.wait())], timeout=60,
                                 return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # the start failed: say why
    assert started.is_set(), "the worker did not start within 60 s"
    return Started(worker, stop, task)


async def until(cond: Any, timeout: float = 30.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.01)


class TestMemory(TransportContract):
    @pytest.fixture
    def config(self) -> Config:
        return from_mapping({"transport": {"kind": "memory",
                                           "memory": {"bus": f"contract-{free_port()}"}},
                             **sections()})


class TestZeroMQ(TransportContract):
    @pytest.fixture
    def config(self) -> Config:
        zmq = {"sub": f"tcp://127.0.0.1:{free_port()}", "pub": f"tcp://127.0.0.1:{free_port()}"}
        return from_mapping({"transport": {"kind": "zmq", "zmq": zmq}, **sections()})


class TestSwergio(TransportContract):
    @pytest.fixture
    def config(self, swergio_port: int) -> Config:
        swergio = {"host": "127.0.0.1", "port": swergio_port}
        return from_mapping({"transport": {"kind": "swergio", "swergio": swergio},
                             **sections()})


class TestNats(TransportContract):
    @pytest.fixture
    def config(self, nats_url: str) -> Config:
        nats = {"servers": [nats_url], "partitions": 2, "storage": "memory",
                "stream": "CONTRACT_LOGITS", "action_stream": "CONTRACT_ACTIONS",
                "dead_letter_stream": ""}
        return from_mapping({"transport": {"kind": "nats", "nats": nats}, **sections()})
