"""Subjects, streams, partitions and consumers of the NATS transport (its topology).

Pure functions of the config, plus the calls that create what is missing on the server;
the package's docstring describes the layout they implement.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import orjson
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, BadRequestError, NotFoundError

from processor.config import Config, NatsConfig
from processor.errors import ConfigError

log = logging.getLogger("swarm_aggregator.nats")

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
                                  "(create it: swarm-aggregator nats setup)") from None
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
