"""The worker loop on the in-process transport: windows, actions, ledger, rejections."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from processor.config import from_mapping
from processor.metrics import Metrics
from processor.worker import Worker
from tests.reference import sum_probs
from transports.memory import MemoryBus, MemoryTransport

pytestmark = pytest.mark.timeout(30)


class Rig:
    """A worker on a private memory bus, and a peer that plays models and evolution."""

    def __init__(self, **sections):
        sections.setdefault("metrics", {"port": 0})
        self.cfg = from_mapping({"transport": {"kind": "memory"}, **sections})
        self.bus = MemoryBus()
        self.metrics = Metrics(CollectorRegistry())
        self.worker = Worker(self.cfg, MemoryTransport(self.cfg, lambda r, d: None, bus=self.bus),
                             self.metrics)
        self.out = self.bus.subscribe("action")
        self.evo = self.bus.subscribe("evolution")  # sees the peer's own requests too
        self.stop = asyncio.Event()

    async def __aenter__(self):
        started = asyncio.Event()
        self.task = asyncio.create_task(self.worker.run(self.stop, started))
        await started.wait()
        return self

    async def __aexit__(self, *exc):
        self.stop.set()
        await asyncio.wait_for(self.task, 5)

    def send(self, obj, topic="logits"):
        self.bus.publish(topic, obj if isinstance(obj, bytes) else orjson.dumps(obj))

    async def next(self, topic, timeout=2.0):
        if topic == "action":
            return orjson.loads((await self.out.get(timeout))[1])
        while True:
            obj = orjson.loads((await self.evo.get(timeout))[1])
            if "CONTRIBUTION" in obj:
                return obj

    async def nothing(self, within=0.2):
        """No action and no evolution reply within that time."""
        with pytest.raises(TimeoutError):
            await self.out.get(within)
        assert not any(b"CONTRIBUTION" in e[1] for e in self.evo.drain())

    def rejected(self, reason):
        return self.metrics.registry.get_sample_value(
            "swarm_aggregator_messages_rejected_total", {"reason": reason})

    def windows(self, outcome):
        return self.metrics.registry.get_sample_value(
            "swarm_aggregator_windows_closed_total", {"outcome": outcome})


def logits_for(rng, models, a=5, b=None):
    shape = (models, a) if b is None else (models, b, a)
    return rng.normal(0, 2, shape).astype(np.float32)


async def test_lockstep_steps_actions_and_get_reset():
    rng = np.random.default_rng(1)
    async with Rig(window={"models": 4, "timeout_ms": 0}) as rig:
        expected: dict[str, float] = {}
        for _ in range(30):
            x = logits_for(rng, 4)
            for m in range(4):
                rig.send({"LOGITS": x[m].tolist(), "COMPONENT_ID": m, "DETERMINISTIC": True})
            out = await rig.next("action")
            _, action, credit = sum_probs(x[:, None, :])
            assert out == {"ACTION": action.tolist()}
            for m in range(4):
                expected[str(m)] = expected.get(str(m), 0.0) + float(credit[m, 0])
        rig.send({"CMD": "GET"}, "evolution")
        reply = await rig.next("evolution")
        assert reply["CONTRIBUTION"] == pytest.approx(expected, abs=1e-5)
        assert sum(reply["CONTRIBUTION"].values()) == pytest.approx(30, abs=1e-4)
        assert reply["STEPS"] == 30 and reply["EPOCH"] == 0
        assert reply["STRATEGY"] == "sum_probs"
        rig.send({"CMD": "GET"}, "evolution")
        again = await rig.next("evolution")
        assert again["CONTRIBUTION"] == {} and again["STEPS"] == 0 and again["EPOCH"] == 1


async def test_get_in_the_same_burst_counts_the_windows_before_it():
    async with Rig(window={"models": 2, "timeout_ms": 0}) as rig:
        rig.send({"LOGITS": [0.0, 1.0], "COMPONENT_ID": "a", "DETERMINISTIC": True})
        rig.send({"LOGITS": [0.0, 3.0], "COMPONENT_ID": "b", "DETERMINISTIC": True})
        rig.send({"CMD": "GET"}, "evolution")
        assert (await rig.next("action")) == {"ACTION": [1]}
        reply = await rig.next("evolution")
        assert sum(reply["CONTRIBUTION"].values()) == pytest.approx(1.0)


async def test_keyed_batched_windows_carry_their_key():
    rng = np.random.default_rng(2)
    async with Rig(window={"models": 3, "key": ["ENV_ID", "STEP"], "timeout_ms": 0}) as rig:
        xs = {}
        for env in ("e1", "e2"):
            xs[env] = logits_for(rng, 3, a=4, b=2)
        for m in range(3):            # interleaved environments
            for env in ("e1", "e2"):
                rig.send({"LOGITS": xs[env][m].tolist(), "COMPONENT_ID": f"m{m}",
                          "DETERMINISTIC": True, "ENV_ID": env, "STEP": 7})
        got = {}
        for _ in range(2):
            out = await rig.next("action")
            got[out["ENV_ID"]] = out
        for env in ("e1", "e2"):
            assert got[env]["STEP"] == 7
            assert got[env]["ACTION"] == sum_probs(xs[env])[1].tolist()
            assert "PARTIAL" not in got[env]


async def test_deadline_publishes_partial_and_counts_it():
    async with Rig(window={"models": 3, "key": ["STEP"], "timeout_ms": 50,
                           "min_models": 2}) as rig:
        rig.send({"LOGITS": [0.0, 2.0], "COMPONENT_ID": "a", "STEP": 1, "DETERMINISTIC": True})
        rig.send({"LOGITS": [0.0, 1.0], "COMPONENT_ID": "b", "STEP": 1, "DETERMINISTIC": True})
        rig.send({"LOGITS": [0.0, 1.0], "COMPONENT_ID": "a", "STEP": 2, "DETERMINISTIC": True})
        out = await rig.next("action", timeout=2)
        assert out == {"ACTION": [1], "STEP": 1, "PARTIAL": True, "MODELS": 2}
        await rig.nothing(0.3)  # step 2 has one model: dropped, not published
        assert rig.windows("partial") == 1
        assert rig.windows("dropped") == 1
        rig.send({"LOGITS": [0.0, 1.0], "COMPONENT_ID": "c", "STEP": 1})
        await asyncio.sleep(0.05)
        assert rig.rejected("late") == 1


async def test_bad_input_is_counted_and_valid_steps_keep_flowing():
    rng = np.random.default_rng(3)
    bad = [b"garbage", b"[1,2]", b'{"COMPONENT_ID": "a"}',
           b'{"LOGITS": [1, "x"], "COMPONENT_ID": "a"}',
           b'{"LOGITS": [1, null], "COMPONENT_ID": "a"}',
           b'{"LOGITS": [1, 2], "COMPONENT_ID": "a", "DETERMINISTIC": "no"}',
           b'{"LOGITS": [1, 2, 3, 4, 5, 6], "COMPONENT_ID": "zz"}',   # shape in the window
           b"x" * (2 << 20)]                                           # over the size limit
    reasons = ["not_json", "not_object", "missing_field", "bad_logits", "bad_logits",
               "bad_deterministic", "shape", "too_large"]
    async with Rig(window={"models": 2, "timeout_ms": 0},
                   limits={"max_message_bytes": 1 << 20}) as rig:
        for i in range(len(bad)):
            x = logits_for(rng, 2)
            rig.send({"LOGITS": x[0].tolist(), "COMPONENT_ID": "p", "DETERMINISTIC": True})
            rig.send(bad[i])
            rig.send({"LOGITS": x[0].tolist(), "COMPONENT_ID": "p", "DETERMINISTIC": True})
            rig.send({"LOGITS": x[1].tolist(), "COMPONENT_ID": "q", "DETERMINISTIC": True})
            out = await rig.next("action")
            assert out["ACTION"] == sum_probs(x[:, None, :])[1].tolist()
        for r in set(reasons):
            assert rig.rejected(r) == reasons.count(r), r
        assert rig.rejected("duplicate") == len(bad)  # lockstep: counted, newer one kept


async def test_evolution_traffic_that_is_not_get_is_ignored():
    async with Rig(window={"models": 1, "timeout_ms": 0}) as rig:
        rig.send(b'{"WEIGHTS": [' + b"0.5," * 10000 + b'0.5], "COMPONENT_ID": 1}', "evolution")
        rig.send({"CMD": "SET", "WEIGHTS": [1, 2]}, "evolution")
        await rig.nothing(0.2)
        assert rig.rejected("not_json") == 0
        rig.send({"CMD": "GET"}, "evolution")
        assert (await rig.next("evolution"))["CONTRIBUTION"] == {}


async def test_stop_publishes_windows_with_quorum():
    async with Rig(window={"models": 3, "timeout_ms": 0, "min_models": 2}) as rig:
        rig.send({"LOGITS": [3.0, 0.0], "COMPONENT_ID": "a", "DETERMINISTIC": True})
        rig.send({"LOGITS": [3.0, 0.0], "COMPONENT_ID": "b", "DETERMINISTIC": True})
        await asyncio.sleep(0.1)
    out = await rig.next("action")
    assert out == {"ACTION": [0], "PARTIAL": True, "MODELS": 2}


async def test_sampling_when_deterministic_is_absent_follows_config_and_seed():
    async def run(seed):
        async with Rig(window={"models": 1, "timeout_ms": 0},
                       aggregate={"seed": seed, "deterministic": False}) as rig:
            acts = []
            for _ in range(40):
                rig.send({"LOGITS": [0.0, 0.0, 0.0, 0.0], "COMPONENT_ID": "a"})
                acts.append((await rig.next("action"))["ACTION"][0])
            return acts
    a, b, c = await run(5), await run(5), await run(6)
    assert a == b and a != c
    assert len(set(a)) > 1  # sampled, not argmax (which would always be 0)


async def test_metrics_count_the_traffic():
    async with Rig(window={"models": 2, "timeout_ms": 0}) as rig:
        for _ in range(5):
            rig.send({"LOGITS": [1.0, 0.0], "COMPONENT_ID": "a", "DETERMINISTIC": True})
            rig.send({"LOGITS": [1.0, 0.0], "COMPONENT_ID": "b", "DETERMINISTIC": True})
            await rig.next("action")
        get = rig.metrics.registry.get_sample_value
        assert get("swarm_aggregator_messages_received_total", {"topic": "logits"}) == 10
        assert get("swarm_aggregator_actions_published_total") == 5
        assert get("swarm_aggregator_windows_closed_total", {"outcome": "complete"}) == 5
        assert get("swarm_aggregator_contribution_total", {"model": "a"}) == pytest.approx(2.5)
        assert get("swarm_aggregator_step_latency_seconds_count", {"since": "first"}) == 5
        assert get("swarm_aggregator_open_windows") == 0


async def send_steps(rig, xs, det=True):
    for x in xs:
        for m in range(x.shape[0]):
            rig.send({"LOGITS": x[m].tolist(), "COMPONENT_ID": f"m{m}", "DETERMINISTIC": det})
        await rig.next("action")


async def test_peek_reset_and_idempotent_get():
    rng = np.random.default_rng(4)
    async with Rig(window={"models": 3, "timeout_ms": 0}) as rig:
        await send_steps(rig, [logits_for(rng, 3) for _ in range(5)])
        rig.send({"CMD": "PEEK"}, "evolution")
        peek = await rig.next("evolution")
        assert peek["STEPS"] == 5 and peek["EPOCH"] == 0
        rig.send({"CMD": "GET", "REQUEST_ID": "r1"}, "evolution")
        first = await rig.next("evolution")
        assert first["CONTRIBUTION"] == pytest.approx(peek["CONTRIBUTION"])
        assert first["REQUEST_ID"] == "r1" and first["STEPS"] == 5
        await send_steps(rig, [logits_for(rng, 3) for _ in range(2)])
        # the reply was "lost": the same request again gets the same snapshot
        rig.send({"CMD": "GET", "REQUEST_ID": "r1"}, "evolution")
        repeat = await rig.next("evolution")
        assert repeat["CONTRIBUTION"] == first["CONTRIBUTION"] and repeat["STEPS"] == 5
        assert repeat["EPOCH"] == 0
        rig.send({"CMD": "GET", "REQUEST_ID": "r2"}, "evolution")
        second = await rig.next("evolution")
        assert second["STEPS"] == 2 and second["EPOCH"] == 1
        await send_steps(rig, [logits_for(rng, 3)])
        rig.send({"CMD": "RESET"}, "evolution")
        rig.send({"CMD": "PEEK"}, "evolution")
        after = await rig.next("evolution")
        assert after["STEPS"] == 0 and after["CONTRIBUTION"] == {} and after["EPOCH"] == 3


async def test_agreement_and_missed_windows_are_reported():
    async with Rig(window={"models": 3, "key": ["STEP"], "timeout_ms": 30}) as rig:
        # m0 and m1 favour action 0, m2 action 1: the action is 0
        for step in range(4):
            for m, row in enumerate([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]]):
                if step == 3 and m == 2:
                    continue  # m2 misses the last window (it closes at the deadline)
                rig.send({"LOGITS": row, "COMPONENT_ID": f"m{m}", "DETERMINISTIC": True,
                          "STEP": step})
            assert (await rig.next("action"))["ACTION"] == [0]
        rig.send({"CMD": "GET"}, "evolution")
        r = await rig.next("evolution")
        assert r["AGREEMENT"] == {"m0": 1.0, "m1": 1.0, "m2": 0.0}
        assert r["MISSED"] == {"m2": 1}
        get = rig.metrics.registry.get_sample_value
        assert get("swarm_aggregator_agreement_total", {"model": "m0"}) == 4
        assert get("swarm_aggregator_agreement_total", {"model": "m2"}) == 0
        assert get("swarm_aggregator_model_steps_total", {"model": "m2"}) == 3
        assert get("swarm_aggregator_missed_windows_total", {"model": "m2"}) == 1


async def test_model_weights_at_run_time_change_the_action():
    async with Rig(window={"models": 2, "timeout_ms": 0},
                   aggregate={"weights": {"b": 3.0}}) as rig:
        def step():
            rig.send({"LOGITS": [3.0, 0.0], "COMPONENT_ID": "a", "DETERMINISTIC": True})
            rig.send({"LOGITS": [0.0, 1.0], "COMPONENT_ID": "b", "DETERMINISTIC": True})
        # P = 1 * softmax(a) + 3 * softmax(b): a gives 0.95 to action 0, b 0.73 to action 1
        step()
        assert (await rig.next("action"))["ACTION"] == [1]
        rig.send({"CMD": "SET_MODEL_WEIGHTS", "MODEL_WEIGHTS": {"b": 1.0}}, "evolution")
        ack = orjson.loads((await rig.evo.get(2))[1])       # the peer's own request
        while "MODEL_WEIGHTS" not in ack or ack.get("CMD"):
            ack = orjson.loads((await rig.evo.get(2))[1])
        assert ack["MODEL_WEIGHTS"] == {"b": 1.0}
        step()
        assert (await rig.next("action"))["ACTION"] == [0]
        rig.send({"CMD": "SET_MODEL_WEIGHTS", "MODEL_WEIGHTS": {"b": "heavy"}}, "evolution")
        await asyncio.sleep(0.05)
        assert rig.rejected("bad_command") == 1


def test_transport_events_are_exported_at_scrape_time():
    m = Metrics(CollectorRegistry())
    events = {"reconnect": 0}
    m.transport_events.source = lambda: dict(events)
    events["reconnect"] = 3
    get = m.registry.get_sample_value
    assert get("swarm_aggregator_transport_events_total", {"event": "reconnect"}) == 3


async def test_float64_masks_are_logits_not_errors():
    """A float64 model masks actions with -1e308 or float64's min: those saturate to the
    float32 range (probability 0), the vote counts, and the lockstep window completes."""
    f64_min = float(np.finfo(np.float64).min)
    async with Rig(window={"models": 2, "timeout_ms": 0}) as rig:
        rig.send({"LOGITS": [1.0, 2.0, -1e308], "COMPONENT_ID": "a", "DETERMINISTIC": True})
        rig.send({"LOGITS": [f64_min, 1.0, 1e308], "COMPONENT_ID": "b",
                  "DETERMINISTIC": True})
        out = await rig.next("action")
        # b's +1e308 takes the limit: probability 1 on action 2; a's mask gives it 0.
        assert out == {"ACTION": [2]}
        rig.send({"CMD": "GET"}, "evolution")
        reply = await rig.next("evolution")
        assert reply["CONTRIBUTION"] == {"a": 0.0, "b": 1.0}
        assert rig.rejected("non_finite") == 0 and rig.rejected("bad_logits") == 0
