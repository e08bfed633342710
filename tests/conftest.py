"""Fixtures shared by the suites: real servers on loopback, one per test, always stopped.

As pyzmq's and nats-core's own test suites do, every server a test needs is started for
that test on ports chosen at run time and stopped when it ends, whatever happened.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nats_helpers import NatsServer
from tests.procs import free_port
from tests.swergio_peers import swergio_server


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """A nats-server with JetStream (storage in the test's folder): its URL."""
    server = NatsServer(tmp_path / "js").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def swergio_port() -> Iterator[int]:
    """The real swergio 0.0.2 room server from PyPI: its port on 127.0.0.1."""
    port = free_port()
    with swergio_server(port):
        yield port
