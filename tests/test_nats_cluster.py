"""NATS JetStream on a 3-node cluster: a node lost mid-stream, and the start-up warnings.

Three clustered nats-servers on 127.0.0.1 (ports chosen at run time, JetStream with file
storage in the test's folder), every stream at 3 replicas, workers as real processes given
all three URLs. The node leading the logits stream is SIGKILLed while windows are open and
models keep publishing, then restarted. Only what holds under any load is asserted: every
step's action stored once, nothing left unacknowledged, the workers serving on without a
restart. How fast service resumes is measured by `python -m bench.nats_failover`, not here.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

import numpy as np
import pytest

import transports.nats as tnats
from processor.config import from_mapping
from tests.nats_helpers import NatsCluster, NatsServer, Swarm, nats_worker, server_binary
from tests.procs import ROOT, cli, output, worker_env
from tests.test_nats import MODELS, check_actions, logits

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(server_binary() is None, reason="no nats-server binary")]

P = 4  # partitions: few consumers keep the cluster's set-up short


@pytest.fixture
def cluster(tmp_path):
    nodes = NatsCluster(tmp_path / "cluster")
    try:
        yield nodes.start()
    finally:
        nodes.stop()


def cluster_config(urls: list[str], **nats_keys):
    return from_mapping({
        "transport": {"kind": "nats", "nats": {"servers": urls, "partitions": P,
                                               "replicas": 3, **nats_keys}},
        "window": {"key": ["ENV_ID", "STEP"], "models": MODELS}})


async def stored(swarm: Swarm, stream: str = "SWARM_ACTIONS") -> int:
    try:
        return int((await swarm.js.stream_info(stream)).state.messages)
    except Exception:  # no leader for a moment
        return -1


async def open_windows(swarm: Swarm, n: int) -> bool:
    try:
        return sum(c.num_ack_pending for c in await swarm.consumers()) == n
    except Exception:
        return False


async def test_losing_the_logits_leader_mid_stream_loses_and_repeats_nothing(cluster):
    urls = cluster.urls
    await tnats.setup(cluster_config(urls))
    envs = [f"env{i}" for i in range(24)]
    xs = logits(np.random.default_rng(7), envs, 12)   # 288 steps
    # The deployment's ack_wait_s: nothing here may wait for a redelivery to make progress.
    keys = {"window__models": MODELS, "window__timeout_ms": 60000,
            "transport__nats__partitions": P, "transport__nats__replicas": 3,
            "transport__nats__ack_wait_s": 10.0}
    async with Swarm(urls) as swarm:
        info = await swarm.js.stream_info("SWARM_LOGITS")
        assert info.config.num_replicas == 3 and len(info.cluster.replicas) == 2
        with nats_worker(urls, 0, 2, **keys) as w0, nats_worker(urls, 1, 2, **keys) as w1:
            for s in range(4):
                for e in envs:
                    await swarm.step(e, s, xs[(e, s)])
            # two of three models of step 4: open windows, unacknowledged, when the node dies
            for e in envs:
                await swarm.step(e, 4, xs[(e, 4)], models=[0, 1])
            assert await swarm.wait(lambda: open_windows(swarm, 2 * len(envs)), 30)
            leader = (await swarm.js.stream_info("SWARM_LOGITS")).cluster.leader
            victim = cluster.node_named(leader)
            moved = {w: p for w, p in (("w0", w0), ("w1", w1))
                     if f"swarm-aggregator {w}" in cluster.clients(victim)}
            victim.stop(signal.SIGKILL)
            for e in envs:   # the models go on through the election
                await swarm.step(e, 4, xs[(e, 4)], models=[2])
            for s in range(5, 9):
                for e in envs:
                    await swarm.step(e, s, xs[(e, s)])
            assert await swarm.wait(lambda: _at_least(stored(swarm), 9 * len(envs)), 60), \
                output(w0)[-3000:] + output(w1)[-3000:]
            victim.start()
            cluster.wait_formed()
            for s in range(9, 12):
                for e in envs:
                    await swarm.step(e, s, xs[(e, s)])
            assert await swarm.wait(lambda: _at_least(stored(swarm), len(xs)), 60), \
                output(w0)[-3000:] + output(w1)[-3000:]
            # acknowledgements lost with the node come back as late deliveries and are
            # settled, at the latest ack_wait_s after the loss
            assert await swarm.wait(swarm.drained, 60), [
                (c.name, c.num_pending, c.num_ack_pending) for c in await swarm.consumers()]
            check_actions(await swarm.stored_actions(), xs)   # once each, never partial
            assert w0.poll() is None and w1.poll() is None    # served on, never restarted
            for w, proc in moved.items():   # those that were on the lost node moved by themselves
                assert "reconnected to" in output(proc), (w, output(proc)[-3000:])


async def _at_least(value, n: int) -> bool:
    return await value >= n


async def test_one_replica_on_several_servers_is_warned_loudly(cluster, caplog):
    """replicas = 1 on a cluster keeps each stream on one node: the start says so, naming
    both keys, whether the config names every node or the server announces the others."""
    names = {"stream": "ONE_LOGITS", "action_stream": "ONE_ACTIONS", "dead_letter_stream": ""}
    for servers in (cluster.urls, cluster.urls[:1]):
        caplog.clear()
        cfg = cluster_config(servers, replicas=1, connect_wait_s=10.0, **names)
        with caplog.at_level(logging.WARNING, logger="swarm_aggregator.nats"):
            async with tnats.NatsTransport(cfg, lambda reason, detail: None) as t:
                assert t.ready
        loud = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "transport.nats.replicas" in r.getMessage()]
        assert loud and "transport.nats.servers" in loud[0], caplog.text
    async with Swarm(cluster.urls) as admin:   # same subjects: only one set of streams
        for name in ("ONE_LOGITS", "ONE_ACTIONS"):
            await admin.js.delete_stream(name)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="swarm_aggregator.nats"):
        async with tnats.NatsTransport(cluster_config(cluster.urls, connect_wait_s=10.0),
                                        lambda reason, detail: None):
            pass
    assert "transport.nats.replicas" not in caplog.text   # 3 replicas: nothing to say


def test_a_wrong_password_says_the_server_refused_it(tmp_path):
    """Not 'no server answered' after connect_wait_s: the server's refusal, at once, in one
    line naming the key, exit 2 as for any other bad config value; never the password."""
    srv = NatsServer(tmp_path / "js", "--user", "swarm", "--pass", "s3cret-pw").start()
    try:
        env = worker_env(transport__kind="nats", transport__nats__servers=[srv.url],
                         transport__nats__user="swarm", transport__nats__connect_wait_s=300,
                         window__key=["ENV_ID", "STEP"], metrics__port=0)
        env["SWARM_AGG__TRANSPORT__NATS__PASSWORD"] = "wrong-pw"
        t0 = time.monotonic()
        r = subprocess.run(cli("run"), cwd=ROOT, capture_output=True, text=True, timeout=100,
                           env={**os.environ, **env})
        assert time.monotonic() - t0 < 100   # long before connect_wait_s
        assert r.returncode == 2, (r.returncode, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "'transport.nats.password'" in lines[0] and "refused" in lines[0], lines[0]
        assert "Authorization Violation" in lines[0], lines[0]
        assert "wrong-pw" not in r.stdout + r.stderr and "s3cret-pw" not in r.stderr
    finally:
        srv.stop()
