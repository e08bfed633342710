"""Prototype (experiment only): the real worker with limits retention + AckAll + purge.

Loaded into the worker process by patchroot/sitecustomize.py when
NATSEXP_PATCH is set (NATSEXP_PATCH=allpurge | all | interest). Monkeypatches
transports.nats.topology and NatsTransport; nothing in the repository is edited.

- logits stream: retention limits (no max_age: nothing expires unprocessed), or interest
- consumers: ack_policy all
- the worker acknowledges, once per burst and per partition, the newest message below
  which every delivered message is settled (the partition's floor); the open windows'
  messages (and everything after them) stay unacknowledged
- allpurge: every PURGE_S the worker purges each partition below its floor
  ($JS.API.STREAM.PURGE with filter logits.<p>.* and seq floor+1)
"""
import asyncio
import collections
import os

import orjson
from nats.js import api

from transports.nats import topology
from transports.nats import transport as tr

MODE = os.environ.get("NATSEXP_PATCH", "")
PURGE_S = float(os.environ.get("NATSEXP_PURGE_S", "1.0"))

_orig_streams = topology.stream_configs


def stream_configs(cfg):
    out = _orig_streams(cfg)
    lg = out[0]
    lg.retention = (api.RetentionPolicy.INTEREST if MODE == "interest"
                    else api.RetentionPolicy.LIMITS)
    return out


_orig_consumer = topology.consumer_config


def consumer_config(cfg, partition):
    c = _orig_consumer(cfg, partition)
    c["ack_policy"] = "all"
    return c


topology.stream_configs = stream_configs
topology.consumer_config = consumer_config
tr.ensure_streams.__globals__["stream_configs"] = stream_configs
tr.ensure_consumers.__globals__["consumer_config"] = consumer_config

T = tr.NatsTransport
_orig_init = T.__init__
_orig_delivery = T._on_delivery
_orig_aenter = T.__aenter__


def __init__(self, cfg, on_reject):
    _orig_init(self, cfg, on_reject)
    self._order = collections.defaultdict(collections.deque)  # partition -> seqs delivered
    self._done = {}      # seq -> reply of its latest delivery, settled, above the floor
    self._floor = {}     # partition -> highest seq acknowledged (AckAll)
    self._purged = {}
    self._purger = None


def _on_delivery(self, subject, reply, data, headers):
    seq = None
    if reply:
        try:
            _, _, seq = tr._ack_fields(reply)
        except (IndexError, ValueError):
            seq = None
    new = seq is not None and seq not in self._held and seq not in self._done
    _orig_delivery(self, subject, reply, data, headers)
    if new and seq in self._held:
        self._order[self._held[seq].partition].append(seq)
    elif seq is not None and seq in self._done:
        self._done[seq] = reply  # a redelivery of a settled message: ack with it later


def _ack(self, tokens):
    held = self._held
    dirty = set()
    for t in tokens:
        seq = t.seq
        if t.released:
            self._released.pop(seq, None)
            continue
        if held.get(seq) is t:
            del held[seq]
        self._done[seq] = t.reply
        dirty.add(t.partition)
    out = []
    for p in dirty:
        q = self._order[p]
        last = None
        while q and q[0] in self._done:
            last = q.popleft()
            reply = self._done.pop(last)
        if last is not None:
            self._floor[p] = last
            out.append(b"PUB " + reply + b" 0\r\n\r\n")
    if out and self._nc is not None:
        self._nc.write(b"".join(out), False)
        self._flush_later()


async def _purge_loop(self):
    nc = self._nc
    stream = self.cfg.stream
    logits = self.t_logits
    while True:
        await asyncio.sleep(PURGE_S)
        for p, floor in list(self._floor.items()):
            if floor > self._purged.get(p, 0):
                body = orjson.dumps({"filter": f"{logits}.{p}.*", "seq": floor + 1})
                try:
                    m = await nc.request(f"$JS.API.STREAM.PURGE.{stream}", body, timeout=2)
                    self._purged[p] = floor
                    self._purges = getattr(self, "_purges", 0) + 1
                    if self._purges % 40 == 1:
                        import sys
                        print("NATSEXP purge", p, floor, m.data[:80], file=sys.stderr,
                              flush=True)
                except Exception:
                    pass


async def __aenter__(self):
    r = await _orig_aenter(self)
    info = await self._js.stream_info(self.cfg.stream)
    ci = await self._js.consumer_info(self.cfg.stream, "part-0")
    import sys
    print(f"NATSEXP patch {MODE}: stream retention {info.config.retention}, consumer ack "
          f"{ci.config.ack_policy}", file=sys.stderr, flush=True)
    if MODE == "allpurge":
        self._purger = asyncio.create_task(_purge_loop(self))
    return r


T.__init__ = __init__
T._on_delivery = _on_delivery
T._ack = _ack
T.__aenter__ = __aenter__
