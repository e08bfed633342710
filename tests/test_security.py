"""CurveZMQ: only known peers are heard; loopback defaults."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import zmq
import zmq.auth

from processor.client import NoReply, Swarm
from processor.config import Config
from tests.procs import cli, free_port, output, process, worker_env, zmq_swarm

pytestmark = pytest.mark.timeout(60)


def curve_peer(pub_to: str, sub_from: str, keys: tuple[bytes, bytes] | None,
               server_public: bytes) -> Swarm:
    """A client swarm with this key pair (None: plain TCP), not yet known to answer."""
    curve = None if keys is None else (*keys, server_public)
    return zmq_swarm(pub_to, sub_from, ready=False, curve=curve)


def test_only_known_peers_are_heard_with_curve(tmp_path):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    r = subprocess.run(cli("keys", "--dir", str(keys), "--name", "worker"),
                                     capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "worker.key_secret" in r.stdout
    zmq.auth.create_certificates(keys, "friend")
    zmq.auth.create_certificates(keys, "stranger")
    shutil.copy(keys / "friend.key", allowed / "friend.key")
    worker_public, _ = zmq.auth.load_certificate(keys / "worker.key")
    friend = zmq.auth.load_certificate(keys / "friend.key_secret")
    stranger = zmq.auth.load_certificate(keys / "stranger.key_secret")

    sub, pub = free_port(), free_port()
    env = worker_env(transport__zmq__sub=f"tcp://127.0.0.1:{sub}",
                     transport__zmq__pub=f"tcp://127.0.0.1:{pub}",
                     transport__zmq__curve_secret_file=str(keys / "worker.key_secret"),
                     transport__zmq__curve_clients_dir=str(allowed),
                     window__models=1, window__timeout_ms=0, metrics__port=0)
    addr = (f"tcp://127.0.0.1:{sub}", f"tcp://127.0.0.1:{pub}")
    with process(cli("run"), env) as proc:
        good = curve_peer(*addr, friend, worker_public)
        bad = curve_peer(*addr, stranger, worker_public)
        plain = curve_peer(*addr, None, worker_public)
        try:
            good.ready(timeout=20)
            for intruder in (bad, plain):
                replies = intruder.subscribe("evolution")
                end = time.monotonic() + 1.5
                while time.monotonic() < end:  # long enough for a connection to form
                    intruder.model("evil", deterministic=True).send([0.0, 9.0])
                    intruder.publish("evolution", {"CMD": "GET"})
                    time.sleep(0.05)
                with pytest.raises(NoReply):
                    good.environment().wait(timeout=0.3)   # not heard
                with pytest.raises(NoReply):
                    replies.get(timeout=0.3)               # and cannot listen either
            good.model("m", deterministic=True).send([5.0, 0.0])
            assert good.environment().wait(timeout=10)["ACTION"] == [0]
            assert set(good.evolution().get()["CONTRIBUTION"]) == {"m"}
        finally:
            for p in (good, bad, plain):
                p.close()
    assert "Traceback" not in output(proc)


def test_curve_config_is_checked_at_start(tmp_path):
    env = worker_env(transport__zmq__curve_secret_file=str(tmp_path / "absent.key_secret"),
                     transport__zmq__curve_clients_dir=str(tmp_path),
                     transport__zmq__sub="tcp://127.0.0.1:0",
                     transport__zmq__pub="tcp://127.0.0.1:0", metrics__port=0)
    with process(cli("run"), env) as proc:
        assert proc.wait(20) == 2
    assert "transport.zmq.curve_secret_file" in output(proc)
    env = worker_env(transport__zmq__curve_secret_file="x")
    r = subprocess.run(cli("check-config"), capture_output=True, text=True,
                                     timeout=30, env={**os.environ, **env})
    assert r.returncode == 2 and "transport.zmq.curve_clients_dir" in r.stderr


def test_every_default_address_is_loopback():
    cfg = Config()
    assert cfg.transport.zmq.sub.startswith("tcp://127.0.0.1:")
    assert cfg.transport.zmq.pub.startswith("tcp://127.0.0.1:")
    assert cfg.transport.swergio.host == "127.0.0.1"
    assert cfg.metrics.host == "127.0.0.1"
