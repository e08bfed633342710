"""A trace of a worker's lockstep windows, taken inside the worker's own process.

`bench.zmq_wire` starts one worker with this folder first on PYTHONPATH and
SWARM_BENCH_TRACE=FILE; Python then runs this module at start-up, which wraps two methods of
the ZeroMQ transport to note, on the clock the driver uses too (`time.perf_counter_ns`:
CLOCK_MONOTONIC, one clock for every process of the machine):

    r <start> <end> <n>   a receive that read n messages (n > 0) between start and end
    p <start> <end> 0     an action handed to the PUB socket

and writes them to FILE when the worker exits. Without the variable nothing is loaded;
nothing of the worker's own code changes. A note costs two clock reads and an append.
"""

from __future__ import annotations

import os

if os.environ.get("SWARM_BENCH_TRACE"):
    import atexit
    import time
    from typing import Any

    from transports import zeromq

    _notes: list[tuple[str, int, int, int]] = []
    _clock = time.perf_counter_ns
    _drain, _publish = zeromq.ZmqTransport._drain, zeromq.ZmqTransport.publish

    def _traced_drain(self: Any, sub: Any) -> Any:
        start = _clock()
        out = _drain(self, sub)
        if out:
            _notes.append(("r", start, _clock(), len(out)))
        return out

    async def _traced_publish(self: Any, topic: str, payload: bytes,
                              dedup: str | None = None) -> bool:
        start = _clock()
        sent = await _publish(self, topic, payload, dedup)
        if topic == "action":  # (the bench's workers keep the default topics)
            _notes.append(("p", start, _clock(), 0))
        return sent

    def _write() -> None:
        with open(os.environ["SWARM_BENCH_TRACE"], "w") as f:
            f.writelines(f"{k} {a} {b} {n}\n" for k, a, b, n in _notes)

    zeromq.ZmqTransport._drain = _traced_drain  # type: ignore[method-assign]
    zeromq.ZmqTransport.publish = _traced_publish  # type: ignore[method-assign]
    atexit.register(_write)
