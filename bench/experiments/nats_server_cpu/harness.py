"""Protocol-level load for nats-server: what the server does per step, variant by variant.

Run from the repository root:  .venv/bin/python bench/experiments/nats_server_cpu/harness.py --help

A "step" = M models each publishing one logits message (same JSON as the client library,
same headers) to logits.<env> with a JetStream PubAck, a worker pulling them from the
partition's pull consumer, publishing one action per step (Nats-Msg-Id) to the action
stream (republished to action.<env>), acknowledging the logits once the action's PubAck
is back. The driver (models + environment) runs in this process; the worker is a
subprocess of this script (raw protocol, write-coalescing like FastClient).

The server's CPU (utime+stime from /proc/<pid>/stat) is read around a fixed number of
steps after a warm-up. Variants change the stream/consumer config, the worker's ack
logic, the pulls, the action path, the server's Go runtime env.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository

import orjson  # noqa: E402

from bench.common import jetstream_up  # noqa: E402

HOST = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")
P = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / TICK


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# --------------------------------------------------------------------------- variants

DEFAULT = {
    "retention": "workqueue",   # workqueue | limits | interest
    "storage": "file",          # file | memory
    "ack": "explicit",          # explicit | all | none
    "pull_batch": 512,          # per partition outstanding; re-pull at half
    "pinned": True,             # priority group pinned_client
    "logits": "js",             # js | js-nomsgid | js-noack (no reply: no PubAck) | core | none
    "action": "js",             # js (stream, dedup, republish) | js-norepublish | core
    "action_dedup": True,       # Nats-Msg-Id on actions
    "transform": True,          # partition() subject transform on the logits stream
    "worker": True,             # False: store only (no consumer, no worker)
    "dup_window_s": 120,
    "max_age_s": 300,           # limits retention: max_age of logits
    "server_env": {},           # e.g. {"GOMAXPROCS": "1"}
    "persist_async": False,     # stream persist_mode async (2.12+?)
    "hb": True,                 # idle_heartbeat on pulls
    "expect_hdr": True,         # Nats-Expected-Stream header on publishes
    "purge_s": 0,               # >0: worker purges each partition below its ack floor this often
    "logits_noack_stream": False,  # stream no_ack: no PubAcks for logits
    "rate": 0,                  # >0: steps/s the driver paces itself to (0: as fast as it can)
}


def stream_configs(v: dict) -> list[dict]:
    dup = int(v["dup_window_s"] * 1e9)
    out = []
    if v["logits"] != "core":
        lg = {"name": "SWARM_LOGITS", "subjects": ["logits.*"] if v["transform"] else ["logits.>"],
              "retention": v["retention"], "storage": v["storage"], "num_replicas": 1,
              "duplicate_window": dup, "discard": "old"}
        if v["transform"]:
            lg["subject_transform"] = {"src": "logits.*",
                                       "dest": "logits.{{partition(8,1)}}.{{wildcard(1)}}"}
        if v["retention"] == "limits" or v["max_age_s"] != DEFAULT["max_age_s"]:
            lg["max_age"] = int(v["max_age_s"] * 1e9)
        if v["persist_async"]:
            lg["persist_mode"] = "async"
        if v["logits_noack_stream"]:
            lg["no_ack"] = True
        if v["retention"] == "limits" and v["purge_s"]:
            lg.pop("max_age", None)
        out.append(lg)
    if v["action"] != "core":
        ac = {"name": "SWARM_ACTIONS", "subjects": ["_swarm.action.>"], "retention": "limits",
              "storage": v["storage"], "num_replicas": 1, "duplicate_window": dup,
              "max_age": int(3600 * 1e9)}
        if v["action"] == "js":
            ac["republish"] = {"src": "_swarm.action.>", "dest": "action.>"}
        if v["persist_async"]:
            ac["persist_mode"] = "async"
        out.append(ac)
    return out


def consumer_config(v: dict, p: int) -> dict:
    name = f"part-{p}"
    c = {"name": name, "durable_name": name, "filter_subject": f"logits.{p}.*",
         "deliver_policy": "all", "ack_policy": v["ack"], "replay_policy": "instant",
         "max_deliver": -1}
    if v["ack"] != "none":
        c["ack_wait"] = int(10e9)
        c["max_ack_pending"] = 20000
    if v["pinned"]:
        c.update(priority_groups=["swarm"], priority_policy="pinned_client",
                 priority_timeout=int(10e9))
    return c


# --------------------------------------------------------------------------- protocol


class Conn(asyncio.Protocol):
    """A raw NATS connection: parses MSG/HMSG, coalesces writes per loop iteration."""

    def __init__(self, on_msg) -> None:
        self.on_msg = on_msg
        self.buf = bytearray()
        self.out: list[bytes] = []
        self.scheduled = False
        self.lazy: asyncio.TimerHandle | None = None
        self.ready = asyncio.get_event_loop().create_future()
        self.transport = None
        self.pongs: list[asyncio.Future] = []
        self.pre_flush = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def write(self, data: bytes, now: bool = True) -> None:
        self.out.append(data)
        if now:
            if not self.scheduled:
                self.scheduled = True
                asyncio.get_event_loop().call_soon(self.flush)
        elif self.lazy is None and not self.scheduled:
            self.lazy = asyncio.get_event_loop().call_later(0.02, self.flush)

    def flush(self) -> None:
        self.scheduled = False
        if self.lazy is not None:
            self.lazy.cancel()
            self.lazy = None
        if self.pre_flush is not None:
            self.pre_flush()
        if self.out:
            self.transport.write(b"".join(self.out))
            self.out = []

    async def ping(self) -> None:
        f = asyncio.get_event_loop().create_future()
        self.pongs.append(f)
        self.write(b"PING\r\n")
        await f

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf.extend(data)
        raw = bytes(buf)
        pos, size = 0, len(raw)
        while pos < size:
            end = raw.find(b"\r\n", pos)
            if end < 0:
                break
            line = raw[pos:end]
            if line.startswith(b"MSG ") or line.startswith(b"HMSG "):
                args = line.split()
                h = args[0] == b"HMSG"
                total = int(args[-1])
                hlen = int(args[-2]) if h else 0
                start = end + 2
                stop = start + total
                if size < stop + 2:
                    break
                n = len(args) - (1 if h else 0)
                reply = args[3] if n == 5 else b""
                self.on_msg(args[1], reply, raw[start + hlen:stop],
                            raw[start:start + hlen] if hlen else None)
                pos = stop + 2
                continue
            pos = end + 2
            if line.startswith(b"INFO"):
                if not self.ready.done():
                    self.transport.write(b'CONNECT {"verbose":false,"pedantic":false,'
                                         b'"headers":true,"no_responders":true,"protocol":1,'
                                         b'"echo":false,"lang":"py","version":"x"}\r\n')
                    self.ready.set_result(None)
            elif line == b"PING":
                self.write(b"PONG\r\n")
            elif line == b"PONG":
                if self.pongs:
                    self.pongs.pop(0).set_result(None)
            elif line.startswith(b"-ERR"):
                print("ERR", line, file=sys.stderr)
        del buf[:pos]


async def connect(url_port: int, on_msg) -> Conn:
    loop = asyncio.get_event_loop()
    _, conn = await loop.create_connection(lambda: Conn(on_msg), HOST, url_port)
    await conn.ready
    await conn.ping()
    return conn


# --------------------------------------------------------------------------- worker


class Worker:
    def __init__(self, v: dict, models: int) -> None:
        self.v = v
        self.models = models
        self.windows: dict[bytes, list] = {}     # key -> [replies(seq,partition)]
        self.pending: dict[int, list] = {}       # action pub id -> tokens
        self.pid = 0
        self.outstanding = [0] * P
        self.pin = [b""] * P
        # AckAll: per partition, delivery order list of [seq, reply, done]
        self.order = [__import__("collections").deque() for _ in range(P)]
        self.tokens: dict[int, list] = {}
        self.dirty: set[int] = set()
        self.floor = [0] * P
        self.purged = [0] * P
        self.purges = 0
        self.actions = 0

    async def run(self, port: int) -> None:
        self.conn = await connect(port, self.on_msg)
        c = self.conn
        if self.v["logits"] in ("core", "js-corelive"):
            c.write(b"SUB logits.* 1\r\n")
        else:
            c.write(b"SUB _W.d.* 1\r\n")
        c.write(b"SUB _W.a.* 2\r\n")
        await c.ping()
        if self.v["logits"] not in ("core", "js-corelive"):
            for p in range(P):
                self.pull(p)
            c.flush()
        if self.v["purge_s"]:
            c.write(b"SUB _W.p.* 3\r\n")
            while True:
                await asyncio.sleep(self.v["purge_s"])
                for p in range(P):
                    if self.floor[p] > self.purged[p]:
                        body = orjson.dumps({"filter": f"logits.{p}.*", "seq": self.floor[p] + 1})
                        c.write(b"PUB $JS.API.STREAM.PURGE.SWARM_LOGITS _W.p.%d %d\r\n%s\r\n"
                                % (p, len(body), body))
                        self.purged[p] = self.floor[p]
                        self.purges += 1
        await asyncio.Event().wait()

    def pull(self, p: int) -> None:
        b = self.v["pull_batch"]
        want = b - self.outstanding[p]
        if want <= b // 2:
            return
        req = {"batch": want, "expires": int(5e9)}
        if self.v["hb"]:
            req["idle_heartbeat"] = int(1e9)
        if self.v["pinned"]:
            req["group"] = "swarm"
            if self.pin[p]:
                req["id"] = self.pin[p].decode()
        body = orjson.dumps(req)
        now = not self.outstanding[p]
        self.outstanding[p] += want
        self.conn.write(b"PUB $JS.API.CONSUMER.MSG.NEXT.SWARM_LOGITS.part-%d _W.d.%d %d\r\n%s\r\n"
                        % (p, p, len(body), body), now)

    def on_msg(self, subject: bytes, reply: bytes, data: bytes, headers) -> None:  # noqa: C901
        if subject.startswith(b"_W.p."):
            if b"error" in data:
                print("purge error", data, file=sys.stderr)
            return
        if subject.startswith(b"_W.a."):
            self.on_puback(int(subject.rsplit(b".", 1)[1]), data)
            return
        if self.v["logits"] in ("core", "js-corelive"):
            p = 0
            tok = None
        else:
            if not reply:  # status (heartbeat / expired)
                p = int(subject.rsplit(b".", 1)[1])
                if headers and not headers.startswith(b"NATS/1.0 100"):
                    self.outstanding[p] = 0
                    self.pull(p)
                return
            t = reply.split(b".")
            i = 3 if len(t) == 9 else 5
            seq = int(t[i + 2])
            p = int(subject.split(b".")[1])
            if self.outstanding[p]:
                self.outstanding[p] -= 1
            if self.v["pinned"] and not self.pin[p] and headers:
                for line in headers.split(b"\r\n"):
                    if line.startswith(b"Nats-Pin-Id:"):
                        self.pin[p] = line.split(b":", 1)[1].strip()
            tok = [seq, reply, False, p]
            if self.v["ack"] == "all":
                self.order[p].append(tok)
            if self.outstanding[p] <= self.v["pull_batch"] // 2:
                self.pull(p)
        msg = orjson.loads(data)
        env = msg["ENV_ID"]
        key = f"{env}|{msg['STEP']}"
        w = self.windows.setdefault(key, [])
        w.append(tok)
        if len(w) == self.models:
            del self.windows[key]
            self.publish_action(env, key, w)

    def publish_action(self, env: str, key: str, tokens: list) -> None:
        payload = orjson.dumps({"ACTION": [3], "ENV_ID": env, "STEP": int(key.split("|")[1])})
        c = self.conn
        self.actions += 1
        if self.v["action"] == "core":
            c.write(b"PUB action.%s %d\r\n%s\r\n" % (env.encode(), len(payload), payload))
            self.settle(tokens)
            return
        self.pid += 1
        head = b"NATS/1.0\r\n"
        if self.v["expect_hdr"]:
            head += b"Nats-Expected-Stream: SWARM_ACTIONS\r\n"
        if self.v["action_dedup"]:
            head += b"Nats-Msg-Id: %s\r\n" % key.encode()
        head += b"\r\n"
        self.pending[self.pid] = tokens
        c.write(b"HPUB _swarm.action.%s _W.a.%d %d %d\r\n%s%s\r\n" % (
            env.encode(), self.pid, len(head), len(head) + len(payload), head, payload))

    def on_puback(self, pid: int, data: bytes) -> None:
        tokens = self.pending.pop(pid, None)
        if tokens is None:
            return
        if b"error" in data:
            print("puback error", data, file=sys.stderr)
        self.settle(tokens)

    def settle(self, tokens: list) -> None:
        ack = self.v["ack"]
        if ack == "none" or self.v["logits"] in ("core", "js-corelive"):
            return
        c = self.conn
        if ack == "explicit":
            c.write(b"".join(b"PUB " + t[1] + b" 0\r\n\r\n" for t in tokens), False)
            return
        # ack all: mark done; each touched partition's floor is acknowledged once, when
        # the connection next writes (or within 20 ms): one ack per partition per burst
        for t in tokens:
            t[2] = True
            self.dirty.add(t[3])
        c.pre_flush = self.ack_floors
        c.write(b"", False)

    def ack_floors(self) -> None:
        c = self.conn
        for p in self.dirty:
            q = self.order[p]
            last = None
            while q and q[0][2]:
                last = q.popleft()
            if last is not None:
                c.out.append(b"PUB " + last[1] + b" 0\r\n\r\n")
                self.floor[p] = last[0]
        self.dirty.clear()


def worker_main(port: int, v: dict, models: int) -> None:
    w = Worker(v, models)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    asyncio.run(w.run(port))


# --------------------------------------------------------------------------- driver


class Driver:
    def __init__(self, v: dict, models: int, lanes: int) -> None:
        import numpy as np

        from processor.client._core import encode_json
        self.v = v
        self.models = models
        self.lanes = lanes
        rng = np.random.default_rng(0)
        self.rows = [rng.normal(0, 2, (models, 18)).astype(np.float32).tolist()
                     for _ in range(16)]
        self.encode = encode_json
        self.step = 0
        self.done = 0
        self.lane_need: list[int] = [0] * lanes   # pubacks + action outstanding
        self.pid = 0
        self.pub_lane: dict[int, int] = {}
        self.stop_at = 0
        self.finished: asyncio.Future | None = None
        self.pubbytes = 0
        self.rate = v.get("rate", 0)
        self.slot = 0.0

    def on_msg(self, subject: bytes, reply: bytes, data: bytes, headers) -> None:  # noqa: C901
        if subject.startswith(b"_D.a."):
            pid = int(subject.rsplit(b".", 1)[1])
            lane = self.pub_lane.pop(pid)
            if data and b"error" in data[:20]:
                print("logits puback error", data, file=sys.stderr)
            self.one_done(lane)
        else:  # action.tp<k>
            lane = int(subject.rsplit(b".", 1)[1][2:])
            self.one_done(lane)

    def one_done(self, lane: int) -> None:
        self.lane_need[lane] -= 1
        if self.lane_need[lane] == 0:
            self.done += 1
            if self.done >= self.stop_at and self.finished and not self.finished.done():
                self.finished.set_result(None)
            if self.rate:
                loop = asyncio.get_event_loop()
                now = loop.time()
                self.slot = max(self.slot + 1.0 / self.rate, now - 0.05)
                if self.slot > now:
                    loop.call_at(self.slot, self.window, lane)
                    return
            self.window(lane)

    def subj(self, env: str) -> bytes:
        if self.v["transform"]:
            return env.encode()
        from transports.nats.topology import partition_of
        return b"%d.%s" % (partition_of(env, P), env.encode())

    def window(self, lane: int) -> None:
        self.step += 1
        step = self.step
        env = f"tp{lane}"
        rows = self.rows[step % 16]
        need = 0
        out = []
        lg = self.v["logits"]
        for m in range(self.models):
            msg = {"LOGITS": rows[m], "COMPONENT_ID": f"m{m}", "DETERMINISTIC": False,
                   "ENV_ID": env, "STEP": step}
            data = self.encode(msg)
            if lg == "core":
                out.append(b"PUB logits.%s %d\r\n%s\r\n" % (env.encode(), len(data), data))
                continue
            head = b"NATS/1.0\r\n"
            if self.v["expect_hdr"]:
                head += b"Nats-Expected-Stream: SWARM_LOGITS\r\n"
            if lg != "js-nomsgid":
                head += b"Nats-Msg-Id: m%d|%s|%d\r\n" % (m, env.encode(), step)
            head += b"\r\n"
            if lg == "js-noack":
                out.append(b"HPUB logits.%s %d %d\r\n%s%s\r\n" % (
                    self.subj(env), len(head), len(head) + len(data), head, data))
                continue
            self.pid += 1
            self.pub_lane[self.pid] = lane
            need += 1
            out.append(b"HPUB logits.%s _D.a.%d %d %d\r\n%s%s\r\n" % (
                self.subj(env), self.pid, len(head), len(head) + len(data), head, data))
        if self.v["worker"]:
            need += 1
        self.lane_need[lane] = need
        self.pubbytes = len(out[0])
        self.conn.write(b"".join(out))
        if need == 0:  # fire and forget (no acks, no worker): pace with a ping
            asyncio.get_event_loop().create_task(self._paced(lane))

    async def _paced(self, lane: int) -> None:
        self.lane_need[lane] = 1
        await self.conn.ping()
        self.one_done(lane)

    async def run(self, port: int, warm: int, steps: int, server_pid: int, mport: int):
        self.conn = await connect(port, self.on_msg)
        live = b"_swarm.action.>" if self.v["action"] == "js-norepublish" else b"action.>"
        self.conn.write(b"SUB _D.a.* 1\r\nSUB %s 2\r\n" % live)
        await self.conn.ping()
        loop = asyncio.get_event_loop()
        self.finished = loop.create_future()
        self.stop_at = warm
        for lane in range(self.lanes):
            self.window(lane)
        await asyncio.wait_for(self.finished, 60)
        v0 = varz(mport)
        c0, t0, d0 = cpu_of(server_pid), time.perf_counter(), self.done
        self.finished = loop.create_future()
        self.stop_at = d0 + steps
        await asyncio.wait_for(self.finished, 120)
        c1, t1, d1 = cpu_of(server_pid), time.perf_counter(), self.done
        v1 = varz(mport)
        n = d1 - d0
        return {"server_us_per_step": 1e6 * (c1 - c0) / n, "steps_per_s": n / (t1 - t0),
                "steps": n,
                "in_msgs_per_step": (v1["in_msgs"] - v0["in_msgs"]) / n,
                "out_msgs_per_step": (v1["out_msgs"] - v0["out_msgs"]) / n,
                "in_bytes_per_step": (v1["in_bytes"] - v0["in_bytes"]) / n,
                "out_bytes_per_step": (v1["out_bytes"] - v0["out_bytes"]) / n,
                "logits_msg_bytes": self.pubbytes}


def varz(mport: int) -> dict:
    with urllib.request.urlopen(f"http://{HOST}:{mport}/varz", timeout=5) as r:
        return json.loads(r.read())


# --------------------------------------------------------------------------- server


def server_binary() -> str:
    b = Path(__file__).resolve().parents[3] / ".venv/bin/nats-server"
    return str(b) if b.exists() else shutil.which("nats-server")


class Server:
    def __init__(self, folder: Path, env: dict | None = None) -> None:
        self.port, self.mport = free_port(), free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.log = open(folder / "server.log", "ab")
        e = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [server_binary(), "-js", "-sd", str(folder / "js"), "-p", str(self.port), "-a", HOST,
             "-m", str(self.mport)], stdout=self.log, stderr=subprocess.STDOUT, env=e)
        if not jetstream_up(self.proc, self.mport):
            raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def api(port: int, subject: str, body: dict) -> dict:
    import nats
    nc = await nats.connect(f"nats://{HOST}:{port}")
    try:
        r = await nc.request(subject, orjson.dumps(body), timeout=5)
        return orjson.loads(r.data)
    finally:
        await nc.close()


async def setup(port: int, v: dict) -> None:
    for sc in stream_configs(v):
        r = await api(port, f"$JS.API.STREAM.CREATE.{sc['name']}", sc)
        if "error" in r:
            raise RuntimeError(f"stream {sc['name']}: {r['error']}")
    if v["worker"] and v["logits"] not in ("core", "js-corelive"):
        for p in range(P):
            r = await api(port, f"$JS.API.CONSUMER.CREATE.SWARM_LOGITS.part-{p}",
                          {"stream_name": "SWARM_LOGITS", "config": consumer_config(v, p)})
            if "error" in r:
                raise RuntimeError(f"consumer {p}: {r['error']}")


def run_variant(v: dict, models: int, lanes: int, warm: int, steps: int,
                folder: Path) -> dict:
    srv = Server(folder, v["server_env"])
    wproc = None
    try:
        asyncio.run(setup(srv.port, v))
        if v["worker"]:
            wproc = subprocess.Popen(
                [sys.executable, __file__, "--worker-port", str(srv.port), "--variant",
                 json.dumps(v), "--models", str(models)],
                cwd=str(Path(__file__).resolve().parents[3]))
            time.sleep(0.5)
        d = Driver(v, models, lanes)
        w0 = cpu_of(wproc.pid) if wproc else 0.0
        res = asyncio.run(d.run(srv.port, warm, steps, srv.proc.pid, srv.mport))
        res["worker_us_per_step_total"] = 1e6 * (cpu_of(wproc.pid) - w0) / d.done if wproc else 0
        res["load"] = loadavg()
        if v["logits"] != "core":
            info = asyncio.run(api(srv.port, "$JS.API.STREAM.INFO.SWARM_LOGITS", {}))
            res["logits_stored_at_end"] = info.get("state", {}).get("messages")
        return res
    finally:
        if wproc is not None:
            wproc.terminate()
            wproc.wait(10)
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker-port", type=int)
    ap.add_argument("--variant", default="{}")
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--lanes", type=int, default=64)
    ap.add_argument("--warm", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=6000)
    a = ap.parse_args()
    v = {**DEFAULT, **json.loads(a.variant)}
    if a.worker_port:
        worker_main(a.worker_port, v, a.models)
        return
    with tempfile.TemporaryDirectory(prefix="natsexp-") as tmp:
        print(json.dumps(run_variant(v, a.models, a.lanes, a.warm, a.steps, Path(tmp))))


if __name__ == "__main__":
    main()
