"""Baseline peers, each run as its own process: `python -m bench.peers ROLE [options]`.

- `zmq-echo`: the worker's sockets (SUB bound for logits and evolution, PUB bound for
  actions) with no aggregation: after every M logits messages it publishes an action.
  Without `--parse` it does not look inside the messages: the ZeroMQ ping-pong, the latency
  floor. With `--parse` it runs `orjson.loads` on every message (on binary logits, packed
  in one body or in three frames: on the JSON header, then `np.frombuffer` on the values)
  and echoes the STEP of the last one: the raw ceiling of a Python receiver.
- `swergio-server`: the PyPI swergio 0.0.2 server, unchanged.
- `swergio-echo`: a swergio component with no math: it answers every M logits messages
  with an action, and a GET with an empty CONTRIBUTION. With `--quickack` it avoids the
  delayed-acknowledgement stall (see `bench.swergio_wire`): the swergio server's ceiling.

The echo peers answer `{"CMD": "GET"}` and `{"CMD": "PEEK"}` on the evolution topic/room
with an empty CONTRIBUTION (and the request's REQUEST_ID), as the worker does: the drivers'
handshake (`processor.client`'s `ready()`). SIGTERM ends them at once (its default action):
they hold nothing worth a clean exit.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

import numpy as np
import orjson

ACTION = b'{"ACTION":[0]}'


def report(body: bytes) -> dict[str, object] | None:
    """The empty report a GET or PEEK is answered with (None for anything else)."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(request, dict) or request.get("CMD") not in ("GET", "PEEK"):
        return None
    out: dict[str, object] = {"CONTRIBUTION": {}}
    if "REQUEST_ID" in request:
        out["REQUEST_ID"] = request["REQUEST_ID"]
    return out


def zmq_echo(sub: str, pub: str, models: int, parse: bool) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    p = ctx.socket(zmq.PUB)
    for sock in (s, p):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
    s.setsockopt(zmq.SUBSCRIBE, b"logits")
    s.setsockopt(zmq.SUBSCRIBE, b"evolution")
    s.bind(sub)
    p.bind(pub)
    recv, send, loads = s.recv_multipart, p.send_multipart, orjson.loads
    frombuffer = np.frombuffer
    count = 0
    gc.disable()  # it allocates no cycles; no collector pauses in the timed path
    while True:
        frames = recv()
        topic, body = frames[0], frames[1]
        if topic == b"logits":
            count += 1
            if parse:
                if body[:1] == b"\x00":  # binary logits packed in one body: header, values
                    end = 5 + int.from_bytes(body[1:5], "little")
                    obj = loads(body[5:end])
                    frombuffer(body, dtype="<f4", offset=end)
                else:
                    obj = loads(body)
                    if len(frames) == 3:  # binary logits: [topic, JSON header, values]
                        frombuffer(frames[2], dtype="<f4")
            if count == models:
                count = 0
                if parse and "STEP" in obj:
                    send((b"action", b'{"ACTION":[0],"STEP":%d}' % obj["STEP"]))
                else:
                    send((b"action", ACTION))
        elif topic == b"evolution" and (reply := report(body)) is not None:
            send((b"evolution", orjson.dumps(reply)))


def swergio_server(host: str, port: int) -> None:
    from swergio import Server

    Server(host, port, "utf-8", 10).start()


def swergio_echo(host: str, port: int, models: int, name: str, quickack: bool) -> None:
    from . import swergio_wire as w

    conn = w.Connection(host, port, name, ("_command", "logits", "action", "evolution"),
                        quickack=quickack)
    conn.sock.settimeout(None)
    action = w.encode(w.data("action", name, ACTION=[0]))
    count = 0
    gc.disable()
    while True:
        body = conn.recv()
        if b'"LOGITS"' in body:
            count += 1
            if count == models:
                count = 0
                conn.send(action)
        elif b'"CMD"' in body and (reply := report(body)) is not None:
            conn.send(w.encode(w.data("evolution", name, **reply)))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers")
    sub = p.add_subparsers(dest="role", required=True)
    z = sub.add_parser("zmq-echo")
    z.add_argument("--sub", required=True, help="endpoint to bind the SUB socket on")
    z.add_argument("--pub", required=True, help="endpoint to bind the PUB socket on")
    z.add_argument("--models", type=int, default=20)
    z.add_argument("--parse", action="store_true")
    s = sub.add_parser("swergio-server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    e = sub.add_parser("swergio-echo")
    e.add_argument("--host", default="127.0.0.1")
    e.add_argument("--port", type=int, required=True)
    e.add_argument("--models", type=int, default=20)
    e.add_argument("--name", default="aggregation")
    e.add_argument("--quickack", action="store_true",
                   help="TCP_QUICKACK before every read (see bench.swergio_wire)")
    args = p.parse_args(argv)
    if args.role == "zmq-echo":
        zmq_echo(args.sub, args.pub, args.models, args.parse)
    elif args.role == "swergio-server":
        swergio_server(args.host, args.port)
    else:
        swergio_echo(args.host, args.port, args.models, args.name, args.quickack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
