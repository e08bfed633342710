"""A lockstep peer with the worker's receive path and none of its work:
`python -m bench.transport_echo --sub EP --pub EP [--models M]`.

It runs the worker's own ZeroMQ transport (`transports.zeromq.ZmqTransport`: its sockets,
its frame reading, its spin in zmq_poll and its wake-ups through the event loop) in an
asyncio loop, as `Worker.run` does, and answers every M-th logits message with an action
without decoding any. Beside the ZeroMQ ping-pong (sockets only) and the worker, it splits
the lockstep latency into the wire, the receive path and the worker's work. GET and PEEK
are answered as `bench.peers` does (the drivers' handshake).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from collections.abc import Sequence

import orjson

from processor.config import from_mapping
from transports.zeromq import ZmqTransport

from .peers import ACTION, report

IDLE_WAIT = 0.1  # as the worker's loop


async def serve(sub: str, pub: str, models: int) -> None:
    cfg = from_mapping({"transport": {"zmq": {"sub": sub, "pub": pub, "rcvhwm": 0,
                                              "sndhwm": 0}}})
    transport = ZmqTransport(cfg, lambda reason, detail: None)
    count = 0
    gc.disable()  # it allocates no cycles; no collector pauses in the timed path
    async with transport:
        while True:
            for topic, payload, _, _ in await transport.receive(IDLE_WAIT):
                if topic == "logits":
                    count += 1
                    if count == models:
                        count = 0
                        await transport.publish("action", ACTION)
                elif isinstance(payload, bytes) and (reply := report(payload)) is not None:
                    await transport.publish("evolution", orjson.dumps(reply))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.transport_echo")
    p.add_argument("--sub", required=True, help="endpoint to bind the SUB socket on")
    p.add_argument("--pub", required=True, help="endpoint to bind the PUB socket on")
    p.add_argument("--models", type=int, default=20)
    args = p.parse_args(argv)
    asyncio.run(serve(args.sub, args.pub, args.models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
