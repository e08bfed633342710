"""A worker that cannot start says why in one line naming the key, exits 2, no traceback;
secrets given by the environment are read as text and never printed."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.procs import ROOT, cli, free_port, process, wait_for, worker_env

pytestmark = pytest.mark.timeout(120)


def start(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def one_line_naming(r: subprocess.CompletedProcess, key: str, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and f"'{key}'" in lines[0], lines[0]
    for w in words:
        assert w in lines[0], lines[0]


def test_a_metrics_port_in_use_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = worker_env(transport__zmq__sub=f"tcp://127.0.0.1:{free_port()}",
                         transport__zmq__pub=f"tcp://127.0.0.1:{free_port()}",
                         metrics__port=port)
        one_line_naming(start(env, "run"), "metrics.port", f"127.0.0.1:{port}")


@pytest.mark.parametrize("which", ["sub", "pub"])
def test_a_zeromq_address_in_use_is_named(which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"sub": free_port(), "pub": free_port(), which: port}
        env = worker_env(transport__zmq__sub=f"tcp://127.0.0.1:{ports['sub']}",
                         transport__zmq__pub=f"tcp://127.0.0.1:{ports['pub']}",
                         metrics__port=0)
        one_line_naming(start(env, "run"), f"transport.zmq.{which}", f"127.0.0.1:{port}")


def test_a_second_worker_on_the_same_ports_is_refused_and_the_first_serves_on():
    sub, pub, mport = free_port(), free_port(), free_port()
    env = worker_env(transport__zmq__sub=f"tcp://127.0.0.1:{sub}",
                     transport__zmq__pub=f"tcp://127.0.0.1:{pub}", metrics__port=mport)
    with process(cli("run"), env) as first:
        assert wait_for(lambda: _listening(mport), 30)
        one_line_naming(start(env, "run"), "metrics.port")
        assert first.poll() is None


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_check_config_refuses_a_port_out_of_range():
    env = worker_env(transport__zmq__sub="tcp://127.0.0.1:99999")
    one_line_naming(start(env, "check-config"), "transport.zmq.sub", "99999")


@pytest.mark.parametrize("field", ["PASSWORD", "TOKEN"])
def test_a_numeric_secret_from_the_environment_is_accepted_and_never_printed(field):
    env = worker_env(transport__kind="nats", window__key=["STEP"])
    env[f"SWARM_AGG__TRANSPORT__NATS__{field}"] = "9081726354"
    r = start(env, "check-config")
    assert r.returncode == 0, r.stderr
    assert "9081726354" not in r.stdout + r.stderr
    # and a refusal elsewhere in the same config does not print it either
    env["SWARM_AGG__WINDOW__MODELS"] = "many"
    r = start(env, "check-config")
    assert r.returncode == 2 and "9081726354" not in r.stdout + r.stderr
