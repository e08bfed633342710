"""NATS JetStream transport: scale-out over partitions, nothing lost when a worker dies.

The package: `transport` (the worker's NatsTransport), `client` (`FastClient`, nats-py's
client with hot subscriptions handled in its read loop: the transport's and the peers'
library's), `topology` (subjects, streams,
partitions and consumers), `connection` (connecting: servers, credentials, TLS, refusals),
`admin` (the operators' helpers: `swarm-aggregator nats setup | get | peek | status |
drive`, also `python -m transports.nats`). The merge of several workers' evolution replies
lives beside the ledger (`processor.ledger.merge_replies`).

Guarantees
- Logits: at-least-once in. A logits message is acknowledged only once the action of its
  window is stored in the action stream (PubAck received), or its window is dropped, or the
  message is rejected. A worker that dies (even SIGKILL) leaves its messages unacknowledged:
  JetStream redelivers them `ack_wait_s` later to whichever worker serves that partition
  next, which rebuilds the windows. (Acknowledgements, one per message, go out with the
  worker's next write, at most 20 ms after the PubAck: a worker that dies in between only
  has those windows rebuilt, and their actions are de-duplicated.)
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
  with its own share, tagged `WORKER`, `WORKERS` and `PARTITIONS`; `processor.ledger.merge_replies`
  (and `swarm-aggregator nats get`) sums the shares.
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

from processor.ledger import merge_replies

from .admin import drive, gather, main, setup, status
from .client import FastClient, header_value
from .connection import connect_options
from .topology import partition_of, subject_token
from .transport import NatsTransport

__all__ = ["FastClient", "NatsTransport", "connect_options", "drive", "gather", "header_value",
           "main", "merge_replies", "partition_of", "setup", "status", "subject_token"]
