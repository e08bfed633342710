"""The worker's NATS JetStream transport (see the package's docstring for its guarantees)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import time
from types import TracebackType
from typing import Any, Self

import orjson
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

from processor.config import Config
from processor.errors import ConfigError

from ..base import MAX_BURST, Envelope, RejectHook
from .client import FastClient, header_value
from .connection import connect_options, refusal, refused_error
from .topology import (
    INTERNAL,
    PRIORITY_GROUP,
    consumer_name,
    ensure_consumers,
    ensure_streams,
    owned_partitions,
    subject_token,
    warn_single_replica,
)

log = logging.getLogger("swarm_aggregator.nats")

PULL_EXPIRES_S = 5.0     # a pull request lives at most this long on the server ...
PULL_HEARTBEAT_S = 1.0   # ... and says it is alive this often while idle
# A partition whose consumer has no leader (NATS elects one 4-9 s after losing a node) is
# asked again this often, so it serves within this long of the election ...
LEADERLESS_RETRY_S = 0.2
# ... and only after this long without a leader is the consumer thought gone and made again.
LEADERLESS_SETUP_S = 20.0
RESEND_MAX_S = 0.25      # the longest pause between two sends of an action not yet stored
# Acknowledgements, and pull requests while half a batch is still on its way, wait this long
# at most for the next write (the next burst's actions) to go with: fewer sends, and fewer
# wake-ups of the server.
LATER_S = 0.02
LOG_EVERY_S = 5.0        # at most one line per kind of trouble in this interval
# Evolution commands waiting for the worker past this many bytes are dropped (core NATS is
# at-most-once; the peer asks again), as nats-py's own subscription limit would.
EVOLUTION_PENDING_BYTES = 64 * 1024 * 1024


class _Held:
    """A delivery token: the latest delivery of one stream message, until it is settled."""

    __slots__ = ("at", "partition", "released", "reply", "seq")

    def __init__(self, reply: bytes, seq: int, at: float, partition: int) -> None:
        self.reply = reply  # the delivery's ack subject
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
    """An action on its way to the action stream, until its PubAck."""

    __slots__ = ("commit", "delay", "retry", "sent", "stored", "wire")

    def __init__(self, wire: bytes) -> None:
        self.wire = wire  # the whole HPUB, with its reply subject: sent again as it is
        self.sent = 0.0
        self.stored = False
        self.delay = 0.05  # the pause before sending again after a refusal (doubling)
        self.retry: asyncio.TimerHandle | None = None
        self.commit: _Commit | None = None


class _Commit:
    """The tokens of one burst, acknowledged once all its actions are stored."""

    __slots__ = ("left", "tokens")

    def __init__(self, tokens: list[Any], left: int) -> None:
        self.tokens = tokens
        self.left = left


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
        self._nc: FastClient | None = None
        self._js: JetStreamContext | None = None
        self._subs: list[Subscription] = []
        self._inbox: collections.deque[Envelope] = collections.deque()
        self._evolution_bytes = 0  # of the evolution messages in _inbox
        self._wake = asyncio.Event()
        self._held: dict[int, _Held] = {}
        self._released: dict[int, _Held] = {}  # handed back, still in a window here
        self._pulls: dict[int, _Pull] = {}
        self._by_consumer: dict[bytes, _Pull] = {}
        self._unconfirmed: list[_Pub] = []
        self._inflight: dict[int, _Pub] = {}  # actions sent, PubAck not yet seen, by id
        self._later: asyncio.TimerHandle | None = None
        self._drained = asyncio.Event()  # no action waits for its PubAck
        self._drained.set()
        self._pub_ids = 0
        self._action_subject: dict[str, bytes] = {}  # HPUB subject by action token (capped)
        self._puback_prefix = ""
        self._expect = f"NATS/1.0\r\nNats-Expected-Stream: {n.action_stream}\r\n".encode()
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
        nc = FastClient()
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
            self._by_consumer[consumer_name(p).encode()] = pull
        # Deliveries, PubAcks and evolution commands go to plain functions
        # (FastClient.direct): no callback task, no queue.
        for subject, handler in ((f"{prefix}.*", self._on_delivery),
                                 (f"{prefix}.ack.*", self._on_puback),
                                 (self.t_evolution, self._on_evolution)):
            sub = await nc.subscribe(subject)
            nc.direct(sub, handler)
            self._subs.append(sub)
        self._puback_prefix = f"{prefix}.ack."
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
            self._pull(pull)
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
        await self._stop_background()
        if nc is None:
            return
        for sub in self._subs:
            with contextlib.suppress(Exception):  # closing anyway
                await sub.unsubscribe()
        # Actions published but never settled (the worker stopped between the two):
        # nothing to acknowledge, their windows' messages come back.
        self._unconfirmed = []
        with contextlib.suppress(TimeoutError):  # given up: their messages come back
            await asyncio.wait_for(self._drained.wait(), self._give_up_at - time.monotonic())
        for pub in self._inflight.values():
            if pub.retry is not None:
                pub.retry.cancel()
        self._inflight.clear()
        if self._tasks:
            tasks = list(self._tasks)
            await asyncio.wait(tasks, timeout=self._give_up_at - time.monotonic() + 1.0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._hand_back()
        await self._unpin()  # the next worker (or the standby) takes over at once
        with contextlib.suppress(Exception):
            await nc.flush(timeout=2)
        await nc.close()
        if self.dead_letters or self.duplicates:
            log.info("nats: %d dead letters, %d duplicate actions suppressed by the stream",
                     self.dead_letters, self.duplicates)

    async def _stop_background(self) -> None:
        if self._later is not None:  # the close's flush sends them
            self._later.cancel()
            self._later = None
        for pull in self._pulls.values():
            if pull.retry is not None:
                pull.retry.cancel()
        for task in (self._keeper, self._setting_up):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _hand_back(self) -> None:
        """What is still held (open windows) goes back now rather than after ack_wait."""
        self.handed_back += len(self._held)
        self._settle(list(self._held.values()), b"-NAK")
        self._held.clear()

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
        if self._evolution_bytes:
            evolution = self.t_evolution
            self._evolution_bytes -= sum(len(e[1]) for e in out if e[0] is evolution)
        if len(inbox) < self._high // 2:
            for pull in self._pulls.values():
                if pull.outstanding <= self.cfg.pull_batch // 2:
                    self._pull(pull)
        return out

    def _on_delivery(self, subject: bytes, reply: bytes, data: bytes,
                     headers: bytes | None) -> None:
        now = time.monotonic()
        if not reply:  # a status: heartbeat, request expired, consumer gone
            self._on_status(subject, headers or b"", now)
            return
        try:
            consumer, delivered, seq = _ack_fields(reply)
        except (IndexError, ValueError):
            self._trouble("reply", "a delivery with an unknown reply subject: %r", reply)
            return
        pull = self._by_consumer.get(consumer)
        if pull is not None:
            if pull.outstanding:
                pull.outstanding -= 1
            pull.seen = now
            pull.leaderless = 0.0
            if headers and not pull.pin:
                # Only until the server names this worker's pin: the only header it reads.
                pull.pin = _header(headers, b"Nats-Pin-Id")
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
            held.reply, held.at, held.released = reply, now, False
            self._held[seq] = held
        elif delivered > self.cfg.max_deliver:
            self._spawn(self._dead_letter(subject.decode(errors="replace"), data, reply, seq,
                                          delivered))
        else:
            held = _Held(reply, seq, now, pull.partition if pull is not None else -1)
            self._held[seq] = held
            self._inbox.append((self.t_logits, data, now, held))
            self._wake.set()
        if pull is not None and pull.outstanding <= self.cfg.pull_batch // 2:
            self._pull(pull)

    def _on_status(self, subject: bytes, headers: bytes, now: float) -> None:
        pull = self._pulls.get(_last_int(subject))
        if pull is None:
            return
        pull.seen = now
        if headers.startswith(b"NATS/1.0 100"):
            pull.leaderless = 0.0
            return  # idle heartbeat: the request is alive
        self._spawn(self._status(pull, headers, now))

    async def _status(self, pull: _Pull, raw: bytes, now: float) -> None:
        """A pull request's end (timeout, no leader, pinned elsewhere, consumer gone)."""
        nc = self._nc
        assert nc is not None
        headers = await nc._process_headers(raw) or {}
        status = headers.get(api.Header.STATUS)
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
            self._release(pull)
        elif status not in ("404", "408"):
            desc = str(headers.get(api.Header.DESCRIPTION, "")).split("\n", 1)[0]
            if "deleted" in desc.lower():
                self._need_setup = True  # the consumer (or JetStream) is gone: make it again
            self._trouble(f"status{status}", "pull on partition %d: %s %s", pull.partition,
                          status, desc)
        self._pull(pull)

    async def _on_leader(self, msg: Msg) -> None:
        """A consumer or the action stream has a new leader (JetStream advisory)."""
        if self._closing:
            return
        kind, _, rest = msg.subject.removeprefix("$JS.EVENT.ADVISORY.").partition(".")
        name = rest.rsplit(".", 1)[-1]
        if kind == "CONSUMER":
            pull = self._by_consumer.get(name.encode())
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
        self._pull(pull)

    def _resend(self, why: str) -> None:
        """Send again, now, every action whose PubAck has not come (the stream de-duplicates)."""
        if self._inflight:
            log.info("nats: %s: sending %d unconfirmed actions again", why, len(self._inflight))
        for pub in list(self._inflight.values()):
            self._send(pub)

    def _pull_later(self, pull: _Pull) -> None:
        if pull.retry is None and not self._closing:
            def fire() -> None:
                pull.retry = None
                self._pull(pull)
            pull.retry = asyncio.get_running_loop().call_later(LEADERLESS_RETRY_S, fire)

    def _on_evolution(self, subject: bytes, reply: bytes, data: bytes,
                      headers: bytes | None) -> None:
        if self._evolution_bytes + len(data) > EVOLUTION_PENDING_BYTES:
            self._trouble("evolution", "evolution message of %d bytes dropped: %d bytes of "
                          "them wait already", len(data), self._evolution_bytes)
            return
        self._evolution_bytes += len(data)
        self._inbox.append((self.t_evolution, data, time.monotonic(), None))
        self._wake.set()

    def _pull(self, pull: _Pull) -> None:
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
        # Nothing on its way: asked now; else with the next write (see LATER_S).
        now = not pull.outstanding
        pull.outstanding += want
        pull.seen = time.monotonic()
        try:
            nc.write(b"PUB %s %s %d\r\n%s\r\n" % (pull.next_subject.encode(),
                                                     pull.inbox.encode(), len(body), body), now)
            if not now:
                self._flush_later()
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

    def _release(self, pull: _Pull) -> None:
        """Hand back (NAK) what this worker holds of a partition another worker now serves."""
        had = pull.pin
        pull.pin = ""
        mine = [h for h in self._held.values() if h.partition == pull.partition]
        self.handed_back += len(mine)
        for h in mine:
            del self._held[h.seq]
            h.released = True
            self._released[h.seq] = h
        self._settle(mine, b"-NAK")
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
                noted = [h for h in self._held.values() if now - h.at > note_after]
                for h in noted:
                    h.at = now
                self._settle(noted, b"+WPI")
                late = now - self.cfg.publish_timeout_s
                for pub in list(self._inflight.values()):
                    if pub.sent < late and pub.retry is None:
                        self._send(pub)  # no PubAck in time: lost on the way, or refused
                for pull in self._pulls.values():
                    if pull.outstanding and now - pull.seen > 3 * self._heartbeat:
                        pull.outstanding = 0  # no heartbeat: the request died with a server
                    self._pull(pull)
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
            self._pub_ids += 1
            pid = self._pub_ids
            # A reply subject of its own: the PubAck finds its action without a future.
            reply = b"%s%d" % (self._puback_prefix.encode(), pid)
            # What js.publish(stream=...) sends: stored by that stream or refused.
            # The id as nats-py would write it (a line break in a key value is a space).
            mid = header_value(key)
            head = self._expect + (b"Nats-Msg-Id: %s\r\n" % mid if mid else b"")
            head += b"\r\n"
            wire = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
                self._action(key), reply, len(head), len(head) + len(payload), head, payload)
            pub = _Pub(wire)
            self._inflight[pid] = pub
            self._drained.clear()
            self._send(pub)
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

    def _action(self, key: str) -> bytes:
        """The action stream's subject for a step key (its first value, made a token)."""
        token = key.split("|", 1)[0]
        subject = self._action_subject.get(token)
        if subject is None:
            if len(self._action_subject) >= 4096:
                self._action_subject.clear()
            subject = f"{self._action_in}.{subject_token(token)}".encode()
            self._action_subject[token] = subject
        return subject

    def _send(self, pub: _Pub) -> None:
        """Send (again) an action; the keeper sends it again if no PubAck comes in time."""
        pub.retry = None
        pub.sent = time.monotonic()
        nc = self._nc
        assert nc is not None
        try:
            nc.write(pub.wire)
        except Exception as e:  # disconnected and buffer full: the keeper sends it again
            self._trouble("send", "action not sent (%r); will retry", e)

    async def settle(self, tokens: list[Any]) -> None:
        pubs, self._unconfirmed = self._unconfirmed, []
        # Acknowledge only once every action published before is stored.
        waiting = [p for p in pubs if not p.stored]
        if not waiting:
            self._ack(tokens)
            return
        commit = _Commit(tokens, len(waiting))
        for p in waiting:
            p.commit = commit

    def _on_puback(self, subject: bytes, reply: bytes, data: bytes,
                   headers: bytes | None) -> None:
        pid = _last_int(subject)
        pub = self._inflight.get(pid)
        if pub is None:
            return  # the PubAck of a second send: the first one's came already
        if not data:  # a status: 503, the stream has no leader (an election) or is gone
            self._need_setup = True
            self._refused_action(pub, "no responders (the action stream has no leader?)")
            return
        try:
            answer = orjson.loads(data)
            error = answer.get("error")
        except (orjson.JSONDecodeError, AttributeError):
            answer, error = {}, f"not a PubAck: {data[:80]!r}"
        if error:
            self._refused_action(pub, error)
            return
        del self._inflight[pid]
        if pub.retry is not None:
            pub.retry.cancel()
        if answer.get("duplicate"):
            self.duplicates += 1
        pub.stored = True
        commit = pub.commit
        if commit is not None:
            commit.left -= 1
            if not commit.left:
                self._ack(commit.tokens)
        if not self._inflight:
            self._drained.set()

    def _refused_action(self, pub: _Pub, why: Any) -> None:
        """Send again soon: a stream without a leader refuses at once until its election
        ends, and the action should be stored right after it."""
        self._trouble("pubfail", "action not stored (%s); will retry", why)
        if pub.retry is None:
            pub.retry = asyncio.get_running_loop().call_later(pub.delay, self._send, pub)
            pub.delay = min(2 * pub.delay, RESEND_MAX_S)

    def _ack(self, tokens: list[Any]) -> None:
        held = self._held
        acked: list[_Held] = []
        for t in tokens:
            seq = t.seq
            if t.released:
                self._released.pop(seq, None)  # another worker has it now
                continue
            if held.get(seq) is t:
                del held[seq]
            acked.append(t)
        if acked:
            self._settle(acked, b"", flush=False)
            self._flush_later()

    def _flush_later(self) -> None:
        """Have what is queued written within LATER_S, if nothing writes it before."""
        if self._later is None:
            self._later = asyncio.get_running_loop().call_later(LATER_S, self._flush_now)

    def _flush_now(self) -> None:
        self._later = None
        if self._nc is not None:
            self._nc.kick()

    def _settle(self, tokens: list[_Held], verb: bytes, flush: bool = True) -> None:
        """Ack (empty), NAK, progress or TERM these deliveries, all in one write.

        The same bytes as nats-py's `msg.ack()` and the like for each, queued at once and
        flushed once: one publish per message cost the worker more CPU than the rest of
        the NATS path.
        """
        nc = self._nc
        if not tokens or nc is None:
            return
        line = b" %d\r\n%s\r\n" % (len(verb), verb)
        try:
            nc.write(b"".join([b"PUB " + t.reply + line for t in tokens]), flush)
        except Exception as e:  # redelivered later; then late or a duplicate
            self._trouble("ack", "%r not sent (%r)", verb or b"ack", e)

    async def _dead_letter(self, subject: str, data: bytes, reply: bytes, seq: int,
                           delivered: int) -> None:
        n = self.cfg
        self.dead_letters += 1
        log.warning("nats: dead letter: %s (stream %s seq %d) delivered %d times, "
                    "max_deliver=%d%s", subject, n.stream, seq, delivered, n.max_deliver,
                    f"; copied to {n.dead_letter_subject}" if n.dead_letter_subject else "")
        if n.dead_letter_subject:
            headers = {"Nats-Msg-Id": f"{n.stream}:{seq}", "Swarm-Subject": subject,
                       "Swarm-Stream-Seq": str(seq), "Swarm-Deliveries": str(delivered)}
            js, nc = self._js, self._nc
            assert js is not None and nc is not None
            while True:
                try:
                    if n.dead_letter_stream:
                        await js.publish(n.dead_letter_subject, data, headers=headers,
                                         stream=n.dead_letter_stream)
                    else:
                        await nc.publish(n.dead_letter_subject, data, headers=headers)
                    break
                except Exception as e:
                    if self._closing:
                        return  # not terminated: it comes back, and is dead-lettered then
                    self._trouble("dead", "dead letter not stored (%r); will retry", e)
                    await asyncio.sleep(1.0)
        self._settle([_Held(reply, seq, 0.0, -1)], b"+TERM")

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


def _ack_fields(reply: bytes) -> tuple[bytes, int, int]:
    """(consumer, delivery count, stream sequence) from a JetStream message's reply subject.

    `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`,
    or the newer form with `<domain>.<account hash>` after ACK and a token at the end.
    """
    t = reply.split(b".")
    i = 3 if len(t) == 9 else 5
    return t[i], int(t[i + 1]), int(t[i + 2])


def _header(raw: bytes, name: bytes) -> str:
    """One header's value from a message's raw headers ("" when absent)."""
    for line in raw.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip() == name:
            return value.strip().decode("utf-8", "replace")
    return ""


def _last_int(subject: bytes) -> int:
    try:
        return int(subject.rsplit(b".", 1)[1])
    except (IndexError, ValueError):
        return -1
