"""NATS JetStream transport: scale-out over partitions, nothing lost when a worker dies.

Guarantees
- Logits: at-least-once in. A logits message is acknowledged only once the action of its
  window is stored in the action stream (PubAck received), or its window is dropped, or the
  message is rejected. A worker that dies (even SIGKILL) leaves its messages unacknowledged:
  JetStream redelivers them `ack_wait_s` later to whichever worker serves that partition
  next, which rebuilds the windows.
- Actions: exactly-once effect. Each action carries `Nats-Msg-Id: <step key>` (the key
  values joined by "|"), so the action stream stores a rebuilt window's action only once
  within `duplicate_window_s`. A step key must therefore not repeat within that window
  (put an episode or run id in the key when environments restart their step counts).
- Per partition, one worker at a time: worker `index` of `workers` serves the partitions
  p with p % workers == index, and the server enforces it (each partition's consumer has a
  pinned-client priority group, NATS 2.11+). A second worker started with the same index
  takes those partitions at once and the first becomes its hot standby, taking them back
  `ack_wait_s` after the second stops pulling (a crash) or at once (a clean stop). Windows
  never span partitions: every message of one window is published on the same token.
- Evolution: core NATS, at-most-once. Every worker receives every command; each answers
  with its own share, tagged `WORKER`, `WORKERS` and `PARTITIONS`; `merge_replies` (and
  `python -m transports.natsio get`) sums the shares.
- Poison messages: a message is handed to a worker at most `max_deliver` times; at its next
  delivery it is copied to `dead_letter_subject` (kept by `dead_letter_stream`), counted,
  logged and terminated. The transport enforces this rather than the server's
  max_deliver, so no dead letter is missed while the partition's owner is down.
- A NATS node lost (a cluster with `replicas` = 3; the worker given every node's URL): the
  worker reconnects to another node by itself. What the lost node led (a stream, some
  partitions' consumers) is unavailable until the others elect a new leader, which NATS
  does 4-9 s after the loss; the rest goes on meanwhile. On a new consumer leader (the
  JetStream advisory) or a reconnect, the worker pulls again at once and resets the
  consumer to its ack floor, so messages lost on the way come back now, not after
  `ack_wait_s`; on a new action-stream leader or a reconnect, it sends again every action
  still without PubAck (the stream de-duplicates). Nothing is lost or published twice.
  With `replicas` = 1 the whole pipeline stalls while the node holding a stream is down;
  the transport warns at start when it sees several servers and one replica.
- While a worker holds a message (its window is open), it tells the server every
  `ack_wait_s / 2` that the message is in progress, so a slow window is not redelivered
  to a live worker; `ack_wait_s` only bounds how soon a dead worker's messages come back.
  A clean stop (SIGTERM) hands what it holds back at once (NAK) and unpins its partitions.

Subjects and streams (P = partitions; subject names follow `[topics]`)
- `logits.<token>`: what models publish (JSON body as on every transport, with the
  step-key fields inside). `<token>` is one subject token (no `.`, space, `*`, `>`) that is
  the same for every message of one window: the environment id. Stream `stream` (work
  queue) takes `logits.*` and stores it as `logits.<partition(P, token)>.<token>`, the
  server's own deterministic subject transform, so publishers need know nothing of the
  workers. One durable pull consumer per partition, `part-<p>`, filters `logits.<p>.*`.
- `action.<first step-key value>`: actions, live. The worker publishes each action to
  `_swarm.action.<token>`, which only stream `action_stream` takes (kept `action_max_age_s`,
  de-duplicated); the stream republishes what it stored on `action.<token>`. So a core
  subscriber of `action.>` sees each stored action once (at-most-once, as core NATS is),
  never the second copy of a rebuilt window; a consumer of the stream reads them
  at-least-once, and can replay.
- `evolution`: commands and replies, core NATS (no stream).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import ssl
import time
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, NotFoundError

from processor.config import Config, NatsConfig
from processor.errors import ConfigError

from .base import MAX_BURST, Envelope, RejectHook

log = logging.getLogger("swarm_aggregator.nats")

PULL_EXPIRES_S = 5.0     # a pull request lives at most this long on the server ...
PULL_HEARTBEAT_S = 1.0   # ... and says it is alive this often while idle
# A partition whose consumer has no leader (NATS elects one 4-9 s after losing a node) is
# asked again this often, so it serves within this long of the election ...
LEADERLESS_RETRY_S = 0.2
# ... and only after this long without a leader is the consumer thought gone and made again.
LEADERLESS_SETUP_S = 20.0
RESEND_MAX_S = 0.25      # the longest pause between two sends of an action not yet stored
LOG_EVERY_S = 5.0        # at most one line per kind of trouble in this interval
INTERNAL = "_swarm"      # actions go in as _swarm.<action>.<token>, come out as <action>.<token>
PRIORITY_GROUP = "swarm"  # the pinned-client group of every partition consumer


def consumer_name(partition: int) -> str:
    return f"part-{partition}"


def partition_of(token: str, partitions: int) -> int:
    """The partition the server's `{{partition(P,1)}}` puts a subject token in (FNV-1a)."""
    h = 0x811C9DC5
    for b in token.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


def owned_partitions(n: NatsConfig) -> list[int]:
    return [p for p in range(n.partitions) if p % n.workers == n.index]


def subject_token(value: str) -> str:
    """A string made fit for one subject token (for the action subject)."""
    out = "".join("_" if c in ". *>\t\r\n" else c for c in value)
    return out or "_"


def stream_configs(cfg: Config) -> list[api.StreamConfig]:
    """The streams the transport creates: logits (partitioned), actions, dead letters."""
    n, t = cfg.transport.nats, cfg.topics
    storage = api.StorageType.FILE if n.storage == "file" else api.StorageType.MEMORY
    out = [
        api.StreamConfig(
            name=n.stream, subjects=[f"{t.logits}.*"],
            description="swarm-aggregator logits, partitioned by step key",
            retention=api.RetentionPolicy.WORK_QUEUE, storage=storage, num_replicas=n.replicas,
            duplicate_window=n.duplicate_window_s,
            subject_transform=api.SubjectTransform(
                src=f"{t.logits}.*",
                dest=f"{t.logits}.{{{{partition({n.partitions},1)}}}}.{{{{wildcard(1)}}}}")),
        api.StreamConfig(
            name=n.action_stream, subjects=[f"{INTERNAL}.{t.action}.>"],
            description="swarm-aggregator actions, one per step key",
            retention=api.RetentionPolicy.LIMITS, storage=storage, num_replicas=n.replicas,
            duplicate_window=n.duplicate_window_s, max_age=n.action_max_age_s,
            republish=api.RePublish(src=f"{INTERNAL}.{t.action}.>", dest=f"{t.action}.>")),
    ]
    if n.dead_letter_stream:
        out.append(api.StreamConfig(
            name=n.dead_letter_stream, subjects=[n.dead_letter_subject],
            description="swarm-aggregator logits delivered max_deliver times, never settled",
            retention=api.RetentionPolicy.LIMITS, storage=storage, num_replicas=n.replicas,
            duplicate_window=n.duplicate_window_s))
    return out


def warn_single_replica(n: NatsConfig, nc: Client) -> None:
    """Say it loudly when a cluster keeps the streams on one node only.

    With replicas = 1 each stream lives on one node; while that node is down no model can
    store logits and no action can be stored: the whole pipeline stalls, however many nodes
    are left. A warning, not a refusal: a test cluster, or a pipeline that can wait, may
    choose it. (An existing stream keeps the replica count it was made with.)
    """
    nodes = {urlsplit(u if "://" in u else f"nats://{u}").netloc for u in n.servers}
    nodes |= {u.netloc for u in nc.discovered_servers}
    if n.replicas == 1 and len(nodes) > 1:
        log.warning(
            "nats: transport.nats.replicas = 1 but transport.nats.servers (with the nodes the "
            "server announced) names %d NATS servers: each stream lives on ONE node, and the "
            "whole pipeline STALLS for as long as that node is down. Set "
            "transport.nats.replicas = 3 on a 3-node cluster (an existing stream: nats stream "
            "edit <name> --replicas 3).", len(nodes))


def consumer_config(cfg: Config, partition: int) -> dict[str, Any]:
    """The durable pull consumer of one partition, as the JetStream API takes it."""
    n = cfg.transport.nats
    name = consumer_name(partition)
    return {
        "name": name, "durable_name": name, "filter_subject": f"{cfg.topics.logits}.{partition}.*",
        "description": f"swarm-aggregator partition {partition} of {n.partitions}",
        "deliver_policy": "all", "ack_policy": "explicit", "replay_policy": "instant",
        "ack_wait": int(n.ack_wait_s * 1e9), "max_ack_pending": n.max_ack_pending,
        "max_deliver": -1,  # enforced by the transport: see the module's docstring
        # One puller at a time (server 2.11+): a second worker with the same index waits,
        # and takes the partition over once the first stops pulling for ack_wait_s.
        "priority_groups": [PRIORITY_GROUP], "priority_policy": "pinned_client",
        "priority_timeout": int(n.ack_wait_s * 1e9)}


async def ensure_streams(js: JetStreamContext, cfg: Config) -> None:
    """Create the streams that are missing; refuse a logits stream of another P."""
    n = cfg.transport.nats
    for sc in stream_configs(cfg):
        assert sc.name is not None
        try:
            info = await js.stream_info(sc.name)
        except NotFoundError:
            if not n.create:
                raise ConfigError("transport.nats.create", f"stream {sc.name} does not exist "
                                  "(create it: python -m transports.natsio setup)") from None
            try:
                await js.add_stream(sc)
                log.info("created stream %s (subjects %s)", sc.name, ", ".join(sc.subjects or []))
                continue
            except BadRequestError as e:
                try:
                    info = await js.stream_info(sc.name)  # another worker made it meanwhile
                except NotFoundError:
                    if "no suitable peers" in str(e.description):
                        # A cluster still forming, or a node down: retried at start until
                        # connect_wait_s (too few nodes for the replicas: then it says so).
                        raise ConnectionError(
                            f"too few NATS nodes online for stream {sc.name} at "
                            f"transport.nats.replicas={sc.num_replicas}: {e.description}"
                        ) from None
                    raise ConfigError("transport.nats", f"the server refuses stream {sc.name}: "
                                      f"{e.description}") from None
        have_r = info.config.num_replicas or 1
        if have_r != sc.num_replicas:
            log.warning("nats: stream %s has %d replicas, transport.nats.replicas says %d; an "
                        "existing stream is not changed (nats stream edit %s --replicas %d)",
                        sc.name, have_r, sc.num_replicas, sc.name, sc.num_replicas)
        if sc.subject_transform is not None:
            have = info.config.subject_transform
            if have is None or have.dest != sc.subject_transform.dest:
                raise ConfigError("transport.nats.partitions", (
                    f"stream {sc.name} maps {have.src if have else '-'} -> "
                    f"{have.dest if have else '-'}, not {sc.subject_transform.dest}: P differs "
                    "(changing P needs a drained stream; see README.md (Scaling out))"))


async def ensure_consumers(js: JetStreamContext, cfg: Config, partitions: list[int]) -> None:
    """Create (or update to this config) the durable consumers of these partitions."""
    n = cfg.transport.nats
    nc: Client = js._nc  # the consumer's priority fields are not in nats-py's ConsumerConfig
    for p in partitions:
        name = consumer_name(p)
        if not n.create:
            try:
                await js.consumer_info(n.stream, name)
            except NotFoundError:
                raise ConfigError("transport.nats.create", f"consumer {name} of "
                                  f"stream {n.stream} does not exist") from None
            continue
        body = orjson.dumps({"stream_name": n.stream, "config": consumer_config(cfg, p)})
        msg = await nc.request(f"$JS.API.CONSUMER.CREATE.{n.stream}.{name}", body, timeout=5)
        resp = orjson.loads(msg.data)
        error = resp.get("error")
        if error is not None:
            if int(error.get("code") or 500) < 500:
                raise ConfigError("transport.nats", f"the server refuses consumer {name}: "
                                  f"{error.get('description')} (pinned-client consumers need "
                                  "NATS server 2.11 or later)")
            APIError.from_error(error)  # raises: JetStream busy (electing a leader), retried


def merge_replies(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """One evolution reply from the shares of several workers.

    CONTRIBUTION, MISSED and STEPS add up exactly; AGREEMENT is averaged, weighted by each
    worker's STEPS.
    """
    contribution: dict[str, float] = {}
    missed: dict[str, int] = {}
    agree: dict[str, float] = {}
    weight: dict[str, float] = {}
    steps = 0
    workers, parts = [], set()
    for r in replies:
        s = int(r.get("STEPS", 0))
        steps += s
        for m, c in r.get("CONTRIBUTION", {}).items():
            contribution[m] = contribution.get(m, 0.0) + c
        for m, c in r.get("MISSED", {}).items():
            missed[m] = missed.get(m, 0) + c
        for m, a in r.get("AGREEMENT", {}).items():
            agree[m] = agree.get(m, 0.0) + a * s
            weight[m] = weight.get(m, 0.0) + s
        workers.append(r.get("WORKER"))
        parts.update(r.get("PARTITIONS", ()))
    return {"CONTRIBUTION": contribution, "STEPS": steps, "MISSED": missed,
            "AGREEMENT": {m: agree[m] / weight[m] for m in agree if weight[m]},
            "WORKERS": workers, "PARTITIONS": sorted(parts)}


class _Held:
    """A delivery token: the latest delivery of one stream message, until it is settled."""

    __slots__ = ("at", "msg", "partition", "released", "seq")

    def __init__(self, msg: Msg, seq: int, at: float, partition: int) -> None:
        self.msg = msg
        self.seq = seq
        self.at = at  # when the server last heard that it is being worked on
        self.partition = partition
        self.released = False  # handed back (NAK): another worker serves its partition now


class _Pull:
    """The pull requests of one partition: how many messages are asked for and not come."""

    __slots__ = ("inbox", "leaderless", "next_subject", "outstanding", "partition", "pin",
                 "retry", "seen", "served")

    def __init__(self, partition: int, next_subject: str, inbox: str) -> None:
        self.partition = partition
        self.next_subject = next_subject
        self.inbox = inbox
        self.outstanding = 0
        self.seen = 0.0
        self.pin = ""  # the server's Nats-Pin-Id while this worker is the partition's puller
        self.served = False  # this worker has been the partition's puller
        self.leaderless = 0.0  # since when pulls find no consumer leader (0: they do)
        self.retry: asyncio.TimerHandle | None = None  # the next pull of a leaderless one


class _Pub:
    __slots__ = ("future", "headers", "payload", "subject")

    def __init__(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        self.subject = subject
        self.payload = payload
        self.headers = headers
        self.future: asyncio.Future[api.PubAck] | None = None


class NatsTransport:
    acks = True

    def __init__(self, cfg: Config, on_reject: RejectHook) -> None:
        self.config = cfg
        self.cfg = n = cfg.transport.nats
        self.t_logits, self.t_action, self.t_evolution = (cfg.topics.logits, cfg.topics.action,
                                                          cfg.topics.evolution)
        self.on_reject = on_reject
        self._action_in = f"{INTERNAL}.{self.t_action}"
        self.worker_id = n.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.partitions = owned_partitions(n)
        self.ready = False
        # counters, for logs and tests
        self.dead_letters = 0
        self.duplicates = 0    # actions the stream already had (a rebuilt window)
        self.redelivered = 0   # deliveries after the first
        self.handed_back = 0   # messages given back (NAK) to the worker now serving them
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._subs: list[Subscription] = []
        self._inbox: collections.deque[Envelope] = collections.deque()
        self._wake = asyncio.Event()
        self._held: dict[int, _Held] = {}
        self._released: dict[int, _Held] = {}  # handed back, still in a window here
        self._pulls: dict[int, _Pull] = {}
        self._by_consumer: dict[str, _Pull] = {}
        self._unconfirmed: list[_Pub] = []
        self._inflight: set[_Pub] = set()  # actions sent, PubAck not yet seen
        self._tasks: set[asyncio.Task[Any]] = set()
        self._keeper: asyncio.Task[None] | None = None
        self._need_setup = False
        self._setting_up: asyncio.Task[None] | None = None
        self._refused: asyncio.Future[str] | None = None  # the server's refusal, at start
        self._last_error = ""  # the last connection error while starting
        self._closing = False
        self._give_up_at = float("inf")
        self._high = max(4 * n.pull_batch, 1024)  # local queue length that stops pulling
        # A new pull request at least every ack_wait_s / 2 keeps this worker's pin (the
        # server unpins a client that sends none for ack_wait_s).
        self._expires = min(PULL_EXPIRES_S, n.ack_wait_s / 2)
        self._heartbeat = min(PULL_HEARTBEAT_S, self._expires / 4)
        self._logged: dict[str, float] = {}
        evo = {"WORKER": self.worker_id, "WORKERS": n.workers, "PARTITIONS": self.partitions}
        self._evolution_tag = evo

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        n = self.cfg
        options = connect_options(n, f"swarm-aggregator {self.worker_id}")
        options.update(
            no_echo=True,  # its own evolution replies need not come back
            error_cb=self._on_error, disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected, closed_cb=self._on_closed)
        nc = Client()
        # nats-py retries a refused login like a missing server, until connect_wait_s; the
        # server's own answer (error_cb) ends the start at once and says what happened.
        self._refused = asyncio.get_running_loop().create_future()
        connect = asyncio.ensure_future(nc.connect(**options))
        either: set[asyncio.Future[Any]] = {connect, self._refused}
        done, _ = await asyncio.wait(either, timeout=n.connect_wait_s or None,
                                     return_when=asyncio.FIRST_COMPLETED)
        if connect not in done or connect.exception() is not None:
            connect.cancel()
            await asyncio.gather(connect, return_exceptions=True)
            self._closing = True  # no "reconnecting" line from the client's callbacks
            with contextlib.suppress(Exception):  # it never connected: nothing to flush
                await nc.close()
            if connect.done() and not connect.cancelled() and connect.exception():
                raise ConnectionError(f"cannot connect to NATS at {', '.join(n.servers)}: "
                                      f"{connect.exception()}")
            if self._refused.done():
                raise refused_error(n, self._refused.result())
            last = f" (last error: {self._last_error})" if self._last_error else ""
            raise ConnectionError(f"no NATS server answered at {', '.join(n.servers)} within "
                                  f"transport.nats.connect_wait_s={n.connect_wait_s}{last}")
        self._refused = None  # from now on a refusal (on a reconnect) is only logged
        self._nc = nc
        warn_single_replica(n, nc)
        self._js = nc.jetstream(timeout=n.publish_timeout_s)
        deadline = time.monotonic() + max(n.connect_wait_s, 5.0)
        while True:
            try:
                await self._setup()
                break
            except ConfigError:
                await nc.close()
                raise
            except Exception as e:  # JetStream not ready yet (cluster election)
                if time.monotonic() > deadline:
                    await nc.close()
                    raise ConnectionError(f"JetStream not available: {e!r}") from None
                self._trouble("setup", "JetStream not ready (%r); retrying", e)
                await asyncio.sleep(n.reconnect_wait_s)
        prefix = nc.new_inbox()
        for p in self.partitions:
            pull = _Pull(p, f"$JS.API.CONSUMER.MSG.NEXT.{n.stream}.{consumer_name(p)}",
                         f"{prefix}.{p}")
            self._pulls[p] = pull
            self._by_consumer[consumer_name(p)] = pull
        pending = max(65536, 4 * n.pull_batch * max(1, len(self.partitions)))
        self._subs.append(await nc.subscribe(f"{prefix}.*", cb=self._on_delivery,
                                             pending_msgs_limit=pending))
        self._subs.append(await nc.subscribe(self.t_evolution, cb=self._on_evolution))
        # A new leader after a node loss: pull from it, and send the actions it may have lost,
        # at once rather than when heartbeats or PubAcks are missed. (Only speed depends on
        # these advisories: a worker not allowed to read them recovers on its timers.)
        advisory = "$JS.EVENT.ADVISORY"
        for subject in (f"{advisory}.CONSUMER.LEADER_ELECTED.{n.stream}.*",
                        f"{advisory}.STREAM.LEADER_ELECTED.{n.action_stream}"):
            self._subs.append(await nc.subscribe(subject, cb=self._on_leader))
        # The newest worker of an index takes its partitions at once (a restart after a crash
        # need not wait for the old pin to time out); one still running becomes the standby.
        await self._unpin()
        for pull in self._pulls.values():
            await self._pull(pull)
        self._keeper = asyncio.create_task(self._keep())
        self.ready = True
        log.info("nats: worker %s serves partitions %s of %d (stream %s)", self.worker_id,
                 self.partitions, n.partitions, n.stream)
        return self

    async def _setup(self) -> None:
        js = self._js
        assert js is not None
        await ensure_streams(js, self.config)
        await ensure_consumers(js, self.config, self.partitions)
        self._need_setup = False

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.ready = False
        self._closing = True
        self._give_up_at = time.monotonic() + min(5.0, 2 * self.cfg.publish_timeout_s)
        nc = self._nc
        for pull in self._pulls.values():
            if pull.retry is not None:
                pull.retry.cancel()
        for task in (self._keeper, self._setting_up):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if nc is None:
            return
        for sub in self._subs:
            with contextlib.suppress(Exception):  # closing anyway
                await sub.unsubscribe()
        if self._unconfirmed:
            # Actions published but never settled (the worker stopped between the two):
            # nothing to acknowledge, their windows' messages come back.
            self._unconfirmed = []
        if self._tasks:
            tasks = list(self._tasks)
            await asyncio.wait(tasks, timeout=self._give_up_at - time.monotonic() + 1.0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # What is still held (open windows) goes back now rather than after ack_wait.
        self.handed_back += len(self._held)
        for h in list(self._held.values()):
            try:
                await h.msg.nak()
            except Exception as e:  # it comes back after ack_wait then
                log.debug("nats: nak not sent (%r)", e)
        self._held.clear()
        await self._unpin()  # the next worker (or the standby) takes over at once
        with contextlib.suppress(Exception):
            await nc.flush(timeout=2)
        await nc.close()
        if self.dead_letters or self.duplicates:
            log.info("nats: %d dead letters, %d duplicate actions suppressed by the stream",
                     self.dead_letters, self.duplicates)

    # -- in ------------------------------------------------------------------------------

    async def receive(self, timeout: float | None) -> list[Envelope]:
        inbox = self._inbox
        if not inbox:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                return []
        n = min(len(inbox), MAX_BURST)
        out = [inbox.popleft() for _ in range(n)]
        if len(inbox) < self._high // 2:
            for pull in self._pulls.values():
                if pull.outstanding <= self.cfg.pull_batch // 2:
                    await self._pull(pull)
        return out

    async def _on_delivery(self, msg: Msg) -> None:
        now = time.monotonic()
        if not msg.reply:  # a status: heartbeat, request expired, consumer gone
            await self._on_status(msg, now)
            return
        consumer, delivered, seq = _ack_fields(msg.reply)
        pull = self._by_consumer.get(consumer)
        if pull is not None:
            pull.outstanding = max(0, pull.outstanding - 1)
            pull.seen = now
            pull.leaderless = 0.0
            if msg.headers and not pull.pin:
                pull.pin = msg.headers.get("Nats-Pin-Id", "")
                if pull.pin:
                    pull.served = True
                    log.info("nats: serving partition %d", pull.partition)
        if delivered > 1:
            self.redelivered += 1
        held = self._held.get(seq) or self._released.pop(seq, None)
        if held is not None:
            # Redelivered while this worker still holds it (an ack or a progress note was
            # lost, or it was handed back and came back here): the window has it already;
            # settle the newest delivery later.
            held.msg, held.at, held.released = msg, now, False
            self._held[seq] = held
        elif delivered > self.cfg.max_deliver:
            self._spawn(self._dead_letter(msg, seq, delivered))
        else:
            held = _Held(msg, seq, now, pull.partition if pull is not None else -1)
            self._held[seq] = held
            self._inbox.append((self.t_logits, msg.data, now, held))
            self._wake.set()
        if pull is not None and pull.outstanding <= self.cfg.pull_batch // 2:
            await self._pull(pull)

    async def _on_status(self, msg: Msg, now: float) -> None:
        pull = self._pulls.get(_last_int(msg.subject))
        if pull is None:
            return
        pull.seen = now
        headers = msg.headers or {}
        status = headers.get(api.Header.STATUS)
        if status == "100":
            pull.leaderless = 0.0
            return  # idle heartbeat: the request is alive
        left = headers.get("Nats-Pending-Messages")
        log.debug("nats: partition %d: pull status %s %s (left %s of %d asked)", pull.partition,
                  status, headers.get(api.Header.DESCRIPTION, ""), left, pull.outstanding)
        pull.outstanding = max(0, pull.outstanding - int(left)) if left else 0
        if status == "503":
            # No responders: the consumer has no leader (a node was lost and the others are
            # electing one) or no longer exists. Ask again soon, for this partition only:
            # the others go on meanwhile.
            if not pull.leaderless:
                pull.leaderless = now
                self._trouble(f"leaderless{pull.partition}", "partition %d: its consumer has "
                              "no leader (a NATS node lost?); asking again", pull.partition)
            elif now - pull.leaderless > LEADERLESS_SETUP_S:
                self._need_setup = True
            self._pull_later(pull)
            return
        if status == "423":
            # Pinned to another worker now (this one was away longer than ack_wait_s): hand
            # back what it holds of that partition, and wait as a standby.
            await self._release(pull)
        elif status not in ("404", "408"):
            desc = str(headers.get(api.Header.DESCRIPTION, "")).split("\n", 1)[0]
            if "deleted" in desc.lower():
                self._need_setup = True  # the consumer (or JetStream) is gone: make it again
            self._trouble(f"status{status}", "pull on partition %d: %s %s", pull.partition,
                          status, desc)
        await self._pull(pull)

    async def _on_leader(self, msg: Msg) -> None:
        """A consumer or the action stream has a new leader (JetStream advisory)."""
        if self._closing:
            return
        kind, _, rest = msg.subject.removeprefix("$JS.EVENT.ADVISORY.").partition(".")
        name = rest.rsplit(".", 1)[-1]
        if kind == "CONSUMER":
            pull = self._by_consumer.get(name)
            if pull is None:
                return
            # A lost leader took this worker's pull requests with it, and what it was
            # delivering may be lost on the way: ask the new one for both. The pin is kept:
            # if the new leader does not know it, it answers 423 and pins the partition anew.
            log.info("nats: partition %d has a new leader", pull.partition)
            pull.outstanding = 0
            pull.leaderless = 0.0
            if pull.retry is not None:
                pull.retry.cancel()
                pull.retry = None
            self._spawn(self._recover(pull))
        elif kind == "STREAM" and name == self.cfg.action_stream:
            self._resend("the action stream has a new leader")

    async def _recover(self, pull: _Pull) -> None:
        """Pull again, after getting back at once what a lost server was delivering.

        Messages a server was delivering to this worker when it died (the server it was
        connected to, or the consumer's leader) are lost on the way, and the consumer would
        hand them out again only after ack_wait_s: every window waiting for one of them
        would stall that long. Resetting the consumer to its ack floor (NATS 2.14+)
        delivers everything not yet acknowledged again, now: what this worker holds comes
        back as a duplicate of itself and is merged, an acknowledgement lost with the node
        comes back late and is settled. (Their delivery counts start again at 1.) A worker
        that never served the partition leaves it alone; one whose pin a new leader forgot
        (423, maybe before this runs) still resets it.
        """
        nc = self._nc
        if pull.served and nc is not None and nc.is_connected and not self._closing:
            subject = f"$JS.API.CONSUMER.RESET.{self.cfg.stream}.{consumer_name(pull.partition)}"
            try:
                reply = await nc.request(subject, b"{}", timeout=2)
                error = orjson.loads(reply.data).get("error")
            except Exception as e:  # no leader yet (its election resets it) or no such API
                error = repr(e)
            if error:
                self._trouble("reset", "partition %d not reset (%s): messages lost on the way "
                              "come back at its next leader election, or after ack_wait_s",
                              pull.partition, error)
            else:
                log.info("nats: partition %d: what was on its way is delivered again",
                         pull.partition)
        await self._pull(pull)

    def _resend(self, why: str) -> None:
        """Send again, now, every action whose PubAck has not come (the stream de-duplicates).

        Cancelling the waits wakes `_confirm`, which sends them again at once instead of
        after publish_timeout_s.
        """
        waiting = [p for p in self._inflight if p.future is not None and not p.future.done()]
        if waiting:
            log.info("nats: %s: sending %d unconfirmed actions again", why, len(waiting))
        for p in waiting:
            assert p.future is not None
            p.future.cancel()

    def _pull_later(self, pull: _Pull) -> None:
        if pull.retry is None and not self._closing:
            def fire() -> None:
                pull.retry = None
                self._spawn(self._pull(pull))
            pull.retry = asyncio.get_running_loop().call_later(LEADERLESS_RETRY_S, fire)

    async def _on_evolution(self, msg: Msg) -> None:
        self._inbox.append((self.t_evolution, msg.data, time.monotonic(), None))
        self._wake.set()

    async def _pull(self, pull: _Pull) -> None:
        """Ask for more messages of one partition, unless enough are on their way."""
        nc = self._nc
        if (self._closing or nc is None or not nc.is_connected or pull.retry is not None
                or len(self._inbox) >= self._high):
            return
        want = self.cfg.pull_batch - pull.outstanding
        if want <= self.cfg.pull_batch // 2:
            return
        request: dict[str, Any] = {"batch": want, "expires": int(self._expires * 1e9),
                                   "idle_heartbeat": int(self._heartbeat * 1e9),
                                   "group": PRIORITY_GROUP}
        if pull.pin:
            request["id"] = pull.pin
        body = orjson.dumps(request)
        log.debug("nats: partition %d: pull %d (pin %r, %d asked before)", pull.partition,
                  want, pull.pin, pull.outstanding)
        pull.outstanding += want
        pull.seen = time.monotonic()
        try:
            await nc.publish(pull.next_subject, body, reply=pull.inbox)
        except Exception as e:  # disconnected: the keeper asks again
            pull.outstanding -= want
            self._trouble("pull", "cannot pull: %r", e)

    async def _unpin(self) -> None:
        nc, stream = self._nc, self.cfg.stream
        assert nc is not None
        body = orjson.dumps({"group": PRIORITY_GROUP})
        for p in self.partitions:
            with contextlib.suppress(Exception):  # nobody pinned, or no server: nothing to do
                await nc.request(f"$JS.API.CONSUMER.UNPIN.{stream}.{consumer_name(p)}", body,
                                 timeout=2)

    async def _release(self, pull: _Pull) -> None:
        """Hand back (NAK) what this worker holds of a partition another worker now serves."""
        had = pull.pin
        pull.pin = ""
        mine = [h for h in self._held.values() if h.partition == pull.partition]
        self.handed_back += len(mine)
        for h in mine:
            del self._held[h.seq]
            h.released = True
            self._released[h.seq] = h
            with contextlib.suppress(Exception):
                await h.msg.nak()
        if had or mine:
            log.warning("nats: partition %d is pinned to another client now (another worker "
                        "with index %d, or this one was away over ack_wait_s, or the server "
                        "restarted or elected a new leader); %d messages handed back",
                        pull.partition, self.cfg.index, len(mine))

    async def _keep(self) -> None:
        """Progress notes for held messages, lost pull requests, re-creation after a loss."""
        n = self.cfg
        tick = min(0.5, n.ack_wait_s / 4)
        note_after = n.ack_wait_s / 2
        while True:
            await asyncio.sleep(tick)
            nc = self._nc
            if nc is None or not nc.is_connected:
                continue
            now = time.monotonic()
            try:
                if self._need_setup and self._setting_up is None:
                    # Beside the keeper: its requests wait out timeouts while JetStream
                    # elects leaders, and progress notes and pulls must go on meanwhile.
                    self._setting_up = asyncio.create_task(self._set_up_again())
                for h in list(self._held.values()):
                    if now - h.at > note_after:
                        h.at = now
                        await h.msg.in_progress()
                for pull in self._pulls.values():
                    if pull.outstanding and now - pull.seen > 3 * self._heartbeat:
                        pull.outstanding = 0  # no heartbeat: the request died with a server
                    await self._pull(pull)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # try again at the next tick
                self._trouble("keeper", "%r", e)

    async def _set_up_again(self) -> None:
        try:
            await self._setup()
            log.info("nats: streams and consumers set up again")
        except Exception as e:  # the keeper tries again at its next tick
            self._trouble("setup", "streams and consumers not set up (%r); will retry", e)
        finally:
            self._setting_up = None

    # -- out -----------------------------------------------------------------------------

    async def publish(self, topic: str, payload: bytes, dedup: str | None = None) -> bool:
        nc = self._nc
        assert nc is not None, "use 'async with transport'"
        if topic == self.t_action:
            key = dedup if dedup is not None else ""
            subject = f"{self._action_in}.{subject_token(key.split('|', 1)[0])}"
            pub = _Pub(subject, payload, {"Nats-Msg-Id": key} if key else {})
            await self._send(pub)
            self._unconfirmed.append(pub)
            return True
        if topic == self.t_evolution:
            try:
                obj = orjson.loads(payload)
                obj.update(self._evolution_tag)
                payload = orjson.dumps(obj)
            except (orjson.JSONDecodeError, AttributeError):
                pass
        try:
            await nc.publish(topic, payload)
            return True
        except Exception as e:  # core NATS is at-most-once; the peer asks again
            self._trouble("publish", "cannot publish on %s: %r", topic, e)
            return False

    async def _send(self, pub: _Pub) -> None:
        js = self._js
        assert js is not None
        self._inflight.add(pub)
        try:
            pub.future = await js.publish_async(pub.subject, pub.payload, headers=pub.headers,
                                                stream=self.cfg.action_stream)
        except Exception as e:  # disconnected and buffer full: sent again
            pub.future = None
            self._trouble("send", "action not sent (%r); will retry", e)

    async def settle(self, tokens: list[Any]) -> None:
        pubs, self._unconfirmed = self._unconfirmed, []
        if pubs:
            # Acknowledge only once every action published before is stored.
            self._spawn(self._commit(pubs, tokens))
        else:
            await self._ack(tokens)

    async def _commit(self, pubs: list[_Pub], tokens: list[Any]) -> None:
        if await self._confirm(pubs):
            await self._ack(tokens)

    async def _confirm(self, pubs: list[_Pub]) -> bool:
        """Wait for the PubAcks, sending again what got none; False when closing first."""
        delay = 0.05
        while True:
            futures = [p.future for p in pubs if p.future is not None]
            if futures:
                await asyncio.wait(futures, timeout=self.cfg.publish_timeout_s)
            retry = []
            for p in pubs:
                f = p.future
                if f is None or not f.done() or f.cancelled():
                    if f is not None:
                        f.cancel()  # frees its slot among publish_async's pending
                    retry.append(p)
                    continue
                e = f.exception()
                if e is None:
                    if f.result().duplicate:
                        self.duplicates += 1
                    self._inflight.discard(p)
                    continue
                if isinstance(e, NoStreamResponseError):
                    self._need_setup = True
                self._trouble("pubfail", "action not stored (%r); will retry", e)
                retry.append(p)
            if not retry:
                return True
            if self._closing and time.monotonic() > self._give_up_at:
                self._inflight.difference_update(pubs)
                return False
            # Short pauses: a stream without a leader refuses at once (no responders) until
            # its election ends, and the action should be stored right after it.
            await asyncio.sleep(delay)
            delay = min(2 * delay, RESEND_MAX_S)
            for p in retry:
                await self._send(p)
            pubs = retry

    async def _ack(self, tokens: list[Any]) -> None:
        held = self._held
        for t in tokens:
            seq = t.seq
            if t.released:
                self._released.pop(seq, None)  # another worker has it now
                continue
            if held.get(seq) is t:
                del held[seq]
            try:
                await t.msg.ack()
            except Exception as e:  # redelivered later; then late or a duplicate
                self._trouble("ack", "ack not sent (%r)", e)

    async def _dead_letter(self, msg: Msg, seq: int, delivered: int) -> None:
        n = self.cfg
        self.dead_letters += 1
        log.warning("nats: dead letter: %s (stream %s seq %d) delivered %d times, "
                    "max_deliver=%d%s", msg.subject, n.stream, seq, delivered, n.max_deliver,
                    f"; copied to {n.dead_letter_subject}" if n.dead_letter_subject else "")
        if n.dead_letter_subject:
            headers = {"Nats-Msg-Id": f"{n.stream}:{seq}", "Swarm-Subject": msg.subject,
                       "Swarm-Stream-Seq": str(seq), "Swarm-Deliveries": str(delivered)}
            js, nc = self._js, self._nc
            assert js is not None and nc is not None
            while True:
                try:
                    if n.dead_letter_stream:
                        await js.publish(n.dead_letter_subject, msg.data, headers=headers,
                                         stream=n.dead_letter_stream)
                    else:
                        await nc.publish(n.dead_letter_subject, msg.data, headers=headers)
                    break
                except Exception as e:
                    if self._closing:
                        return  # not terminated: it comes back, and is dead-lettered then
                    self._trouble("dead", "dead letter not stored (%r); will retry", e)
                    await asyncio.sleep(1.0)
        try:
            await msg.term()
        except Exception as e:
            self._trouble("ack", "term not sent (%r)", e)

    def stamp(self, topic: str) -> dict[str, Any] | None:
        return None

    def counters(self) -> dict[str, int]:
        """Events of this transport so far, for metrics (by event name)."""
        return {"dead_letter": self.dead_letters, "duplicate_action": self.duplicates,
                "redelivery": self.redelivered, "handed_back": self.handed_back}

    # -- housekeeping --------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _trouble(self, kind: str, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._logged.get(kind, float("-inf")) >= LOG_EVERY_S:
            self._logged[kind] = now
            log.warning("nats: " + fmt, *args)

    async def _on_error(self, e: Exception) -> None:
        if self._refused is not None:
            # Starting: the start's own error will say what happened, in one line.
            self._last_error = str(e) or type(e).__name__
            log.debug("nats: while connecting: %s", self._last_error)
            if refusal(e) and not self._refused.done():
                self._refused.set_result(refusal(e))
            return
        self._trouble("error", "%s", e or type(e).__name__)

    async def _on_disconnected(self) -> None:
        self.ready = False
        if not self._closing:
            log.warning("nats: disconnected; reconnecting")

    async def _on_reconnected(self) -> None:
        nc = self._nc
        log.info("nats: reconnected to %s", nc.connected_url.netloc if nc and nc.connected_url
                 else "?")
        # What was sent through the lost server may never have arrived: the PubAck would
        # only be missed after publish_timeout_s.
        self._resend("reconnected")
        for pull in self._pulls.values():
            pull.outstanding = 0  # the old requests may have died with the server
            self._spawn(self._recover(pull))
        self.ready = True

    async def _on_closed(self) -> None:
        self.ready = False


def connect_options(n: NatsConfig, name: str) -> dict[str, Any]:
    """nats.connect() keyword arguments from the config (servers, credentials, TLS)."""
    options: dict[str, Any] = {
        "servers": n.servers, "name": name, "allow_reconnect": True,
        "max_reconnect_attempts": -1, "reconnect_time_wait": n.reconnect_wait_s,
        "connect_timeout": 2}
    if n.user:
        options.update(user=n.user, password=n.password)
    if n.token:
        options["token"] = n.token
    if n.tls_ca or n.tls_cert:
        options["tls"] = _tls_context(n)
    return options


def refusal(e: BaseException) -> str:
    """The server's words when an error is its refusal of the credentials, else ""."""
    text = str(e).removeprefix("nats: ").strip().strip("'")
    low = text.lower()
    return text if ("authorization" in low or "authentication" in low) else ""


def refused_error(n: NatsConfig, answer: str) -> ConfigError:
    """The start error for refused credentials: names the key to fix, never its value."""
    if n.token:
        key, given = "transport.nats.token", "the token"
    elif n.user:
        key, given = "transport.nats.password", f"user {n.user!r} and its password"
    else:
        key, given = "transport.nats.user", "no credentials (the server requires them)"
    return ConfigError(key, f"the NATS server at {', '.join(n.servers)} refused {given}: "
                            f"{answer}")


def _ack_fields(reply: str) -> tuple[str, int, int]:
    """(consumer, delivery count, stream sequence) from a JetStream message's reply subject.

    `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`,
    or the newer form with `<domain>.<account hash>` after ACK and a token at the end.
    """
    t = reply.split(".")
    i = 3 if len(t) == 9 else 5
    return t[i], int(t[i + 1]), int(t[i + 2])


def _last_int(subject: str) -> int:
    try:
        return int(subject.rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return -1


def _tls_context(n: NatsConfig) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=n.tls_ca or None)
        if n.tls_cert:
            ctx.load_cert_chain(n.tls_cert, n.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("transport.nats.tls_ca", f"cannot load TLS files: {e}") from None
    return ctx


# -- operators' helpers: python -m transports.natsio setup | get | peek | status | drive --


async def _quiet(e: Exception) -> None:
    log.debug("nats: %s", e)


async def _connect(cfg: Config) -> Client:
    n = cfg.transport.nats
    options = connect_options(n, "swarm-aggregator admin")
    options.update(max_reconnect_attempts=3, error_cb=_quiet)
    return await asyncio.wait_for(nats.connect(**options), max(n.connect_wait_s, 2.0))


async def setup(cfg: Config) -> list[str]:
    """Create the streams and every partition's consumer; returns what now exists."""
    nc = await _connect(cfg)
    try:
        js = nc.jetstream()
        await ensure_streams(js, cfg)
        await ensure_consumers(js, cfg, list(range(cfg.transport.nats.partitions)))
        return [sc.name or "" for sc in stream_configs(cfg)]
    finally:
        await nc.close()


async def gather(cfg: Config, command: str = "GET", timeout: float = 5.0,
                 request_id: str | None = None) -> tuple[dict[str, Any], list[int]]:
    """Send an evolution command to every worker and merge their shares.

    Returns the merged reply and the partitions no reply covered. GET is sent again with the
    same REQUEST_ID until every partition is covered (a worker answers a repeated id with
    the same report, without a second reset), so a lost reply costs no share.
    """
    import uuid

    n, topic = cfg.transport.nats, cfg.topics.evolution
    rid = request_id or uuid.uuid4().hex
    replies: dict[str, dict[str, Any]] = {}
    arrived = asyncio.Event()

    async def on_reply(msg: Msg) -> None:
        try:
            obj = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        if isinstance(obj, dict) and obj.get("REQUEST_ID") == rid and "WORKER" in obj:
            replies[str(obj["WORKER"])] = obj
            arrived.set()

    def missing() -> list[int]:
        covered = {p for r in replies.values() for p in r.get("PARTITIONS", ())}
        return [p for p in range(n.partitions) if p not in covered]

    nc = await _connect(cfg)
    try:
        await nc.subscribe(topic, cb=on_reply)
        end = time.monotonic() + timeout
        while missing() and time.monotonic() < end:
            await nc.publish(topic, orjson.dumps({"CMD": command, "REQUEST_ID": rid}))
            resend = time.monotonic() + 0.5
            while missing() and (left := min(resend, end) - time.monotonic()) > 0:
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), left)
    finally:
        await nc.close()
    merged = merge_replies(list(replies.values()))
    merged["REQUEST_ID"] = rid
    return merged, missing()


async def status(cfg: Config) -> dict[str, Any]:
    """Streams' message counts and each partition consumer's backlog."""
    n = cfg.transport.nats
    nc = await _connect(cfg)
    try:
        js = nc.jetstream()
        out: dict[str, Any] = {"streams": {}, "partitions": {}}
        for sc in stream_configs(cfg):
            try:
                info = await js.stream_info(sc.name or "")
                out["streams"][sc.name] = info.state.messages
            except NotFoundError:
                out["streams"][sc.name] = None
        for p in range(n.partitions):
            try:
                ci = await js.consumer_info(n.stream, consumer_name(p))
                out["partitions"][p] = {"pending": ci.num_pending,
                                        "ack_pending": ci.num_ack_pending,
                                        "redelivered": ci.num_redelivered,
                                        "pulls_waiting": ci.num_waiting}
            except NotFoundError:
                out["partitions"][p] = None
        return out
    finally:
        await nc.close()


async def drive(cfg: Config, models: int = 8, actions: int = 6, envs: int = 16,
                rate: float = 10.0, steps: int = 0) -> tuple[int, int]:
    """Simulated models and environments: every 1/rate s, each environment's next step.

    Publishes on logits.<env> with JetStream (PubAck) and reads the live actions; prints a
    line a second. Environment ids carry a random run id, so a restarted driver never
    reuses a step key. Returns (steps sent, actions received); runs `steps` steps (0: for
    ever).
    """
    import uuid

    import numpy as np

    t = cfg.topics
    run = uuid.uuid4().hex[:6]
    names = [f"{run}-{e}" for e in range(envs)]
    sent_at: dict[tuple[str, int], float] = {}
    lat: list[float] = []
    got = 0

    async def on_action(msg: Msg) -> None:
        nonlocal got
        obj = orjson.loads(msg.data)
        at = sent_at.pop((obj.get("ENV_ID"), obj.get("STEP")), None)
        if at is not None:
            got += 1
            lat.append(time.monotonic() - at)

    rng = np.random.default_rng()
    nc = await _connect(cfg)
    try:
        js = nc.jetstream()
        await nc.subscribe(f"{t.action}.>", cb=on_action)
        while True:  # the workers (or `setup`) create the stream
            try:
                await js.stream_info(cfg.transport.nats.stream)
                break
            except NotFoundError:
                print("waiting for the logits stream", flush=True)
                await asyncio.sleep(1.0)
        step, last = 0, time.monotonic()
        while not steps or step < steps:
            tick = time.monotonic()
            x = rng.normal(0, 2, (envs, models, actions)).astype(np.float32).tolist()
            futures = []
            for e, env in enumerate(names):
                sent_at[(env, step)] = tick
                for m in range(models):
                    body = orjson.dumps({"ENV_ID": env, "STEP": step, "COMPONENT_ID": f"m{m}",
                                         "DETERMINISTIC": False, "LOGITS": x[e][m]})
                    futures.append(await js.publish_async(f"{t.logits}.{env}", body))
            await asyncio.gather(*futures)
            step += 1
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                p50 = sorted(lat)[len(lat) // 2] * 1000 if lat else float("nan")
                print(f"steps {step * envs}  actions {got}  waiting {len(sent_at)}  "
                      f"latency p50 {p50:.1f} ms", flush=True)
                lat.clear()
            await asyncio.sleep(max(0.0, 1 / rate - (time.monotonic() - tick)))
        end = time.monotonic() + 10
        while sent_at and time.monotonic() < end:
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    return step * envs, got


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    from processor.config import load

    parser = argparse.ArgumentParser(
        prog="swarm-aggregator nats",
        description="NATS helpers of swarm-aggregator. Config as for `swarm-aggregator run`: "
                    "-c FILE and SWARM_AGG__* variables.")
    parser.add_argument("command", choices=("setup", "get", "peek", "status", "drive"),
                        help="setup: create streams and all consumers; get/peek: ask every "
                        "worker for its share and print the sum; status: backlogs; drive: "
                        "simulated models and environments")
    parser.add_argument("-c", "--config", help="TOML config file")
    parser.add_argument("--servers", help="comma-separated NATS URLs (overrides the config)")
    parser.add_argument("--timeout", type=float, default=5.0, help="get/peek: seconds")
    parser.add_argument("--models", type=int, default=8, help="drive: models (M)")
    parser.add_argument("--actions", type=int, default=6, help="drive: actions (A)")
    parser.add_argument("--envs", type=int, default=16, help="drive: environments")
    parser.add_argument("--rate", type=float, default=10.0, help="drive: steps/s per env")
    parser.add_argument("--steps", type=int, default=0, help="drive: steps per env (0: ever)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.servers:
        overrides["transport"] = {"nats": {"servers": args.servers.split(",")}}
    try:
        cfg = load(args.config, overrides=overrides)
    except ConfigError as e:
        print(f"bad config: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "setup":
            names = asyncio.run(setup(cfg))
            print(f"ok: streams {', '.join(names)}; consumers part-0..part-"
                  f"{cfg.transport.nats.partitions - 1}")
        elif args.command in ("get", "peek"):
            merged, missing = asyncio.run(gather(cfg, args.command.upper(), args.timeout))
            print(json.dumps(merged, indent=1, sort_keys=True))
            if missing:
                print(f"no worker answered for partitions {missing}", file=sys.stderr)
                return 1
        elif args.command == "status":
            print(json.dumps(asyncio.run(status(cfg)), indent=1))
        else:
            sent, got = asyncio.run(drive(cfg, args.models, args.actions, args.envs, args.rate,
                                          args.steps))
            print(f"done: {sent} steps, {got} actions")
            return 0 if got == sent else 1
    except (OSError, TimeoutError, nats.errors.Error) as e:
        print(f"cannot reach NATS: {e!r}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
