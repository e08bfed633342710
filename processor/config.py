"""Configuration: one frozen dataclass tree built from defaults, a TOML file and the environment.

Precedence, lowest first: the defaults below, the TOML file given with `-c`, then environment
variables `SWARM_AGG__SECTION__KEY` (double underscores between levels, for example
`SWARM_AGG__TRANSPORT__ZMQ__SUB=tcp://0.0.0.0:5555`). An environment value is converted by
the declared type of its key: a string key takes the text as it is (a password `123456`
stays a string), any other key reads it as a TOML value (`5`, `true`, `["ENV_ID","STEP"]`).
Any unknown key, wrong type or out-of-range value raises `ConfigError` naming the key.
Secrets (`password`, `token`) never appear in an error, a log line or a repr; a secret may
be written as a number in the file (`password = 123456`), and is the number's text.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

ENV_PREFIX = "SWARM_AGG__"
TRANSPORT_KINDS = ("zmq", "swergio", "nats", "memory")
STRATEGIES = ("sum_probs", "boltzmann_addition", "boltzmann_multiplication", "majority_vote",
              "rank_vote")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")



@dataclass(frozen=True)
class ZmqConfig:
    sub: str = "tcp://127.0.0.1:5555"
    pub: str = "tcp://127.0.0.1:5556"
    sub_bind: bool = True
    pub_bind: bool = True
    rcvhwm: int = 100_000  # messages queued per peer before ZeroMQ drops (counted by peers)
    sndhwm: int = 100_000
    # After the queue runs dry, keep polling this long before sleeping, while most recent
    # waits for a message were that short (lockstep); 0: never (see transports/zeromq.py).
    spin_us: int = 200
    # CurveZMQ (see `swarm-aggregator keys`): the worker's secret certificate turns it on.
    curve_secret_file: str = ""
    curve_clients_dir: str = ""         # public certificates of the peers let in (bound sockets)
    curve_server_public_file: str = ""  # the server's public certificate (connected sockets)


@dataclass(frozen=True)
class SwergioConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    name: str = "aggregation"
    header_length: int = 10
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 5.0


@dataclass(frozen=True)
class MemoryConfig:
    bus: str = "default"


@dataclass(frozen=True)
class NatsConfig:
    """NATS JetStream (scale-out): see transports/nats/ for the subjects and streams."""

    servers: list[str] = field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    stream: str = "SWARM_LOGITS"         # logits, partitioned by step key (a work queue)
    action_stream: str = "SWARM_ACTIONS"  # actions, de-duplicated by Nats-Msg-Id
    partitions: int = 8                  # P
    workers: int = 1                     # K: this worker owns partitions p % K == index
    index: int = 0                       # this worker's index k, 0 <= k < K
    worker_id: str = ""                  # tags evolution replies; default host-pid
    ack_wait_s: float = 10.0             # redelivery after this long without an ack
    max_deliver: int = 5                 # deliveries before a message goes to dead letters
    dead_letter_subject: str = "swarm.dead"  # "" = dead letters are only counted and logged
    dead_letter_stream: str = "SWARM_DEAD"   # keeps the dead letters; "" = not kept
    duplicate_window_s: float = 120.0    # the action stream's de-duplication window
    action_max_age_s: float = 3600.0     # actions are kept this long in the action stream
    create: bool = True                  # create streams and consumers when missing
    storage: str = "file"                # file | memory, for the streams it creates
    replicas: int = 1                    # stream replicas (3 on a 3-node cluster)
    max_ack_pending: int = 20000         # unacknowledged messages per partition at most
    pull_batch: int = 512                # messages per pull request
    publish_timeout_s: float = 5.0       # an action without PubAck by then is sent again
    reconnect_wait_s: float = 1.0        # between reconnection attempts (forever)
    connect_wait_s: float = 30.0         # give up starting after this long without a server
    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""


@dataclass(frozen=True)
class TransportConfig:
    kind: str = "zmq"
    zmq: ZmqConfig = field(default_factory=ZmqConfig)
    swergio: SwergioConfig = field(default_factory=SwergioConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    nats: NatsConfig = field(default_factory=NatsConfig)


@dataclass(frozen=True)
class TopicsConfig:
    logits: str = "logits"
    action: str = "action"
    evolution: str = "evolution"


@dataclass(frozen=True)
class WindowConfig:
    models: int = 20            # expected models per window; 0 = the models seen recently
    model_ids: list[str] = field(default_factory=list)  # a fixed roster; models is then ignored
    key: list[str] = field(default_factory=list)  # step-key fields; [] = lockstep
    timeout_ms: int = 5000      # deadline after a window's first message; 0 = wait forever
    min_models: int = 1         # quorum for publishing a window at its deadline
    max_open: int = 1024        # open windows at most; the oldest is closed first
    recent_s: float = 10.0      # models = 0: a model counts while seen within this time
    late_memory: int = 65536    # closed step keys remembered to recognise late messages


@dataclass(frozen=True)
class AggregateConfig:
    strategy: str = "sum_probs"
    deterministic: bool = False  # used when a message carries no DETERMINISTIC
    seed: int = 0
    temperature: float = 1.0     # T of the Boltzmann rules and of the votes' sampling
    weights: dict[str, float] = field(default_factory=dict)  # per model; absent = 1.0


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    port: int = 9464            # 0 = no metrics server
    max_models: int = 100       # distinct model labels; the rest go under model="other"


@dataclass(frozen=True)
class LogConfig:
    level: str = "INFO"
    rate_limit_s: float = 5.0   # at most one line per rejection reason in this interval


@dataclass(frozen=True)
class LimitsConfig:
    max_message_bytes: int = 16 * 1024 * 1024
    max_actions: int = 100_000  # A, the action count of one logits row
    max_batch: int = 4096       # B, the environments of one batched message
    # Distinct models the worker keeps state for (the models a window can miss, the
    # ledger's models in a period, one window's models): memory stays bounded whatever
    # ids peers invent. Beyond it the least recent model gives up its place.
    max_models: int = 1024


@dataclass(frozen=True)
class Config:
    transport: TransportConfig = field(default_factory=TransportConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def expected_models(self) -> int:
        """Models a window waits for: the roster's size, else `window.models` (0 = recent)."""
        return len(self.window.model_ids) or self.window.models

    def describe(self) -> str:
        """One line for the start-up log: transport, addresses, window settings; no secrets."""
        t = self.transport
        if t.kind == "zmq":
            where = (f"sub={t.zmq.sub} ({'bind' if t.zmq.sub_bind else 'connect'}) "
                     f"pub={t.zmq.pub} ({'bind' if t.zmq.pub_bind else 'connect'})")
        elif t.kind == "swergio":
            where = f"server={t.swergio.host}:{t.swergio.port} name={t.swergio.name}"
        elif t.kind == "nats":
            n = t.nats
            where = (f"servers={','.join(n.servers)} stream={n.stream} partitions={n.partitions}"
                     f" worker={n.index}/{n.workers}")
        else:
            where = f"bus={t.memory.bus}"
        w = self.window
        expected = (f"roster={len(w.model_ids)}" if w.model_ids
                    else f"models={w.models or 'recent'}")
        return (f"transport={t.kind} {where} topics={self.topics.logits}/{self.topics.action}/"
                f"{self.topics.evolution} window: {expected} key={w.key or 'lockstep'} "
                f"timeout_ms={w.timeout_ms} min_models={w.min_models} max_open={w.max_open} "
                f"strategy={self.aggregate.strategy}")


class EnvText(str):
    """An environment variable's text: its key's declared type says how to read it."""


def _from_env(value: EnvText, tp: Any, key: str, secret: bool) -> Any:
    if tp is str:
        return str(value)
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        if secret:
            raise ConfigError(key, "not a valid value (hidden: it is a secret)") from None
        # A list of strings may be written bare: a,b,c
        if typing.get_origin(tp) is list:
            return [v.strip() for v in value.split(",") if v.strip()]
        return str(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _secret(value: Any, key: str) -> str:
    # A number written for a password is its text; nothing else is shown.
    if _is_int(value):
        return str(value)
    if isinstance(value, str):
        return value
    raise ConfigError(key, f"expected a string, got a {type(value).__name__} "
                      "(hidden: it is a secret)")


def _strings(value: Any, key: str) -> list[str]:
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list of strings, got {value!r}")
    for item in value:
        # Model ids may be written as numbers; they are strings on the wire.
        if not (isinstance(item, str) or _is_int(item)):
            raise ConfigError(key, f"expected a list of strings, got item {item!r}")
    return [str(item) for item in value]


def _numbers(value: Any, key: str) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a table of numbers, got {value!r}")
    for k, v in value.items():
        if not (_is_int(v) or isinstance(v, float)):
            raise ConfigError(f"{key}.{k}", f"expected a number, got {v!r}")
    return {str(k): float(v) for k, v in value.items()}


# Leaf types: (does the value fit, how it is stored, what was expected)
_SCALARS: dict[Any, tuple[Any, Any, str]] = {
    bool: (lambda v: isinstance(v, bool), bool, "true or false"),
    int: (_is_int, int, "an integer"),
    float: (lambda v: _is_int(v) or isinstance(v, float), float, "a number"),
    str: (lambda v: isinstance(v, str), str, "a string"),
}


def _convert(value: Any, tp: Any, key: str, secret: bool = False) -> Any:
    """Check (and lightly coerce) one leaf value against its annotated type."""
    if isinstance(value, EnvText):
        value = _from_env(value, tp, key, secret)
    if secret:
        return _secret(value, key)
    scalar = _SCALARS.get(tp)
    if scalar is not None:
        fits, store, expected = scalar
        if not fits(value):
            raise ConfigError(key, f"expected {expected}, got {value!r}")
        return store(value)
    origin = typing.get_origin(tp)
    if origin is list:
        return _strings(value, key)
    if origin is dict:
        return _numbers(value, key)
    raise ConfigError(key, f"unsupported type {tp!r}")  # pragma: no cover


def _build(cls: Any, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in data:
        if name not in names:
            full = f"{prefix}{name}"
            raise ConfigError(full, f"unknown key (valid here: {', '.join(sorted(names))})")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(key, "expected a table")
            kwargs[f.name] = _build(tp, value, f"{key}.")
        else:
            kwargs[f.name] = _convert(value, tp, key, secret=not f.repr)
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The nested table that the SWARM_AGG__* variables describe."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if not all(parts):
            raise ConfigError(name, "empty level in environment variable name")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(".".join(parts), "set both as a value and as a table")
        node[parts[-1]] = EnvText(raw)
    return tree


def _port_problem(port: str, what: str, wildcard: bool) -> str | None:
    if wildcard and port in ("*", "0"):
        return None
    if not port.isdigit() or not 0 < int(port) < 65536:
        return f"port {port!r} of {what} is not 1..65535"
    return None


def zmq_endpoint_problem(addr: str) -> str | None:
    """Why `addr` is no ZeroMQ endpoint the worker can use, or None.

    tcp://HOST:PORT (PORT 1..65535, or * or 0 for a random port when binding),
    ipc://PATH, inproc://NAME.
    """
    scheme, sep, rest = addr.partition("://")
    if not sep or not rest:
        return f"not a ZeroMQ endpoint: {addr!r} (tcp://HOST:PORT, ipc://PATH or inproc://NAME)"
    if scheme in ("ipc", "inproc"):
        return None
    if scheme != "tcp":
        return f"unsupported transport {scheme!r} in {addr!r} (tcp, ipc or inproc)"
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        return f"no HOST:PORT in {addr!r}"
    return _port_problem(port, repr(addr), wildcard=True)


def nats_url_problem(url: str) -> str | None:
    """Why `url` is no NATS server URL, or None: nats://HOST[:PORT] (also tls, ws, wss)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("nats", "tls", "ws", "wss"):
        return f"not a NATS URL: {url!r} (nats://HOST:PORT)"
    hostport = rest.split("/", 1)[0]
    host, colon, port = hostport.rpartition(":")
    if not colon:
        host, port = hostport, ""
    if not host:
        return f"no host in {url!r}"
    return None if not port else _port_problem(port, repr(url), wildcard=False)


def _need(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _validate(cfg: Config) -> None:
    _validate_transport(cfg)
    _validate_nats(cfg)
    _validate_window(cfg)
    _validate_rest(cfg)


def _validate_transport(cfg: Config) -> None:
    need, t = _need, cfg.transport
    need(t.kind in TRANSPORT_KINDS, "transport.kind",
         f"unknown transport {t.kind!r} (valid: {', '.join(TRANSPORT_KINDS)})")
    need(0 < t.swergio.port < 65536, "transport.swergio.port", "must be 1..65535")
    need(1 <= t.swergio.header_length <= 32, "transport.swergio.header_length", "must be 1..32")
    need(t.swergio.reconnect_min_s > 0, "transport.swergio.reconnect_min_s", "must be > 0")
    need(t.swergio.reconnect_max_s >= t.swergio.reconnect_min_s,
         "transport.swergio.reconnect_max_s", "must be >= reconnect_min_s")
    for k in ("sub", "pub"):
        problem = zmq_endpoint_problem(getattr(t.zmq, k))
        need(problem is None, f"transport.zmq.{k}", problem or "")
    need(t.zmq.rcvhwm >= 0, "transport.zmq.rcvhwm", "must be >= 0")
    if t.zmq.curve_secret_file:
        need(bool(t.zmq.curve_clients_dir) or not (t.zmq.sub_bind or t.zmq.pub_bind),
             "transport.zmq.curve_clients_dir",
             "must name the folder of allowed peers' public certificates when CURVE is on")
        need(bool(t.zmq.curve_server_public_file) or (t.zmq.sub_bind and t.zmq.pub_bind),
             "transport.zmq.curve_server_public_file",
             "must name the server's public certificate for sockets that connect")
    need(t.zmq.sndhwm >= 0, "transport.zmq.sndhwm", "must be >= 0")
    need(0 <= t.zmq.spin_us <= 100_000, "transport.zmq.spin_us", "must be 0 to 100000")

def _validate_nats(cfg: Config) -> None:
    need, t, w = _need, cfg.transport, cfg.window
    n = t.nats

    def nats_name(name: str) -> bool:
        return bool(name) and all(c.isalnum() or c in "-_" for c in name)

    def nats_subject(subject: str) -> bool:
        return all(tok and not any(c in tok for c in " \t\r\n*>")
                   for tok in subject.split("."))

    need(bool(n.servers), "transport.nats.servers", "must name at least one server")
    for url in n.servers:
        # Credentials in a URL would reach the start-up log line: they have keys of their
        # own. Checked first, so that no message below can print them.
        need("@" not in url, "transport.nats.servers",
             "must not carry credentials; use transport.nats.user/password or token")
        problem = nats_url_problem(url)
        need(problem is None, "transport.nats.servers", problem or "")
    need(n.partitions >= 1, "transport.nats.partitions", "must be >= 1")
    need(1 <= n.workers <= n.partitions, "transport.nats.workers",
         "must be 1..transport.nats.partitions")
    need(0 <= n.index < n.workers, "transport.nats.index", "must be 0..workers-1")
    need(n.ack_wait_s > 0, "transport.nats.ack_wait_s", "must be > 0")
    need(n.max_deliver >= 1, "transport.nats.max_deliver", "must be >= 1")
    need(n.duplicate_window_s > 0, "transport.nats.duplicate_window_s", "must be > 0")
    need(n.action_max_age_s >= n.duplicate_window_s, "transport.nats.action_max_age_s",
         "must be >= transport.nats.duplicate_window_s")
    need(n.storage in ("file", "memory"), "transport.nats.storage", "must be file or memory")
    need(1 <= n.replicas <= 5, "transport.nats.replicas", "must be 1..5")
    need(n.max_ack_pending >= 1, "transport.nats.max_ack_pending", "must be >= 1")
    need(1 <= n.pull_batch <= 10000, "transport.nats.pull_batch", "must be 1..10000")
    need(n.publish_timeout_s > 0, "transport.nats.publish_timeout_s", "must be > 0")
    need(n.reconnect_wait_s > 0, "transport.nats.reconnect_wait_s", "must be > 0")
    need(n.connect_wait_s >= 0, "transport.nats.connect_wait_s", "must be >= 0")
    need(bool(n.tls_cert) == bool(n.tls_key), "transport.nats.tls_key",
         "tls_cert and tls_key go together")
    for k in ("stream", "action_stream", "dead_letter_stream"):
        name = getattr(n, k)
        need(nats_name(name) or (k == "dead_letter_stream" and not name),
             f"transport.nats.{k}", "must be a stream name (letters, digits, - and _)")
    need(not n.dead_letter_subject or nats_subject(n.dead_letter_subject),
         "transport.nats.dead_letter_subject", "must be a subject without wildcards")
    need(not n.dead_letter_stream or bool(n.dead_letter_subject),
         "transport.nats.dead_letter_subject", "must be set when dead_letter_stream is")
    if t.kind == "nats":
        need(bool(w.key), "window.key", "must name the step-key fields on NATS (lockstep "
             "windows cannot be partitioned)")
        need(w.timeout_ms > 0, "window.timeout_ms", "must be > 0 on NATS: after a worker "
             "dies, a window whose other messages were already acknowledged closes only "
             "at its deadline")
        for k in ("logits", "action", "evolution"):
            need(nats_subject(getattr(cfg.topics, k)), f"topics.{k}",
                 "must be a NATS subject without wildcards or spaces")

def _validate_window(cfg: Config) -> None:
    need, w = _need, cfg.window
    for k in ("logits", "action", "evolution"):
        need(bool(getattr(cfg.topics, k)), f"topics.{k}", "must not be empty")
    need(len({cfg.topics.logits, cfg.topics.action, cfg.topics.evolution}) == 3, "topics",
         "logits, action and evolution must be three different topics")
    need(w.models >= 0, "window.models", "must be >= 0")
    need(len(set(w.model_ids)) == len(w.model_ids), "window.model_ids", "has duplicates")
    need(w.timeout_ms >= 0, "window.timeout_ms", "must be >= 0")
    need(w.min_models >= 1, "window.min_models", "must be >= 1")
    need(w.max_open >= 1, "window.max_open", "must be >= 1")
    need(w.recent_s > 0, "window.recent_s", "must be > 0")
    need(w.late_memory >= 0, "window.late_memory", "must be >= 0")
    need(len(set(w.key)) == len(w.key), "window.key", "has duplicates")
    need(not (cfg.expected_models() == 0 and w.timeout_ms == 0), "window.timeout_ms",
         "must be > 0 when window.models = 0 (recent membership needs a deadline)")

def _validate_rest(cfg: Config) -> None:
    need, a = _need, cfg.aggregate
    need(a.strategy in STRATEGIES, "aggregate.strategy",
         f"unknown strategy {a.strategy!r} (valid: {', '.join(STRATEGIES)})")
    need(a.temperature > 0, "aggregate.temperature", "must be > 0")
    for m, wt in a.weights.items():
        need(math.isfinite(wt) and wt >= 0, f"aggregate.weights.{m}",
             "must be a finite number >= 0")
    need(0 <= cfg.metrics.port < 65536, "metrics.port", "must be 0..65535")
    need(cfg.metrics.max_models >= 0, "metrics.max_models", "must be >= 0")
    need(cfg.log.level.upper() in LOG_LEVELS, "log.level",
         f"unknown level {cfg.log.level!r} (valid: {', '.join(LOG_LEVELS)})")
    need(cfg.log.rate_limit_s >= 0, "log.rate_limit_s", "must be >= 0")
    need(cfg.limits.max_message_bytes > 0, "limits.max_message_bytes", "must be > 0")
    need(cfg.limits.max_actions > 0, "limits.max_actions", "must be > 0")
    need(cfg.limits.max_batch > 0, "limits.max_batch", "must be > 0")
    need(cfg.limits.max_models >= max(1, cfg.expected_models()), "limits.max_models",
         f"must be >= 1 and >= the models a window expects ({cfg.expected_models()})")


def from_mapping(data: Mapping[str, Any]) -> Config:
    """A validated Config from a nested mapping (as TOML gives)."""
    cfg: Config = _build(Config, data, "")
    _validate(cfg)
    return cfg


def load(path: str | os.PathLike[str] | None = None,
         environ: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file at `path`, then SWARM_AGG__* variables, then `overrides`."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("-c", f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("-c", f"{p} is not valid TOML: {e}") from None
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    return from_mapping(data)


def replace(cfg: Config, **sections: Mapping[str, Any]) -> Config:
    """A copy of `cfg` with some keys of some sections changed, validated again."""
    data = to_mapping(cfg)
    return from_mapping(_merge(data, sections))


def to_mapping(obj: Any) -> Any:
    """The plain nested dict of a config."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, dict)):
        return obj.copy()
    return obj


