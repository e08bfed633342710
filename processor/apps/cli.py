"""The `swarm-aggregator` command: run, demo, proxy, check-config, top, loadgen."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from .. import __version__
from ..config import Config, load
from ..errors import ConfigError

log = logging.getLogger("swarm_aggregator")

EPILOG = """\
Config: a TOML file (-c) and/or environment variables SWARM_AGG__SECTION__KEY, for example
  SWARM_AGG__TRANSPORT__KIND=swergio SWARM_AGG__WINDOW__MODELS=20 swarm-aggregator run
Without either, the defaults apply: ZeroMQ, SUB bound on tcp://127.0.0.1:5555 (logits and
evolution in), PUB bound on tcp://127.0.0.1:5556 (actions and replies out), 20 models per
window, lockstep, 5 s deadline, metrics on http://127.0.0.1:9464/metrics.
Transports (transport.kind): zmq (default), swergio, nats (NATS JetStream: several workers,
see 'swarm-aggregator nats --help' for its helpers), memory (in-process).
"""


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _load(path: str | None) -> Config:
    try:
        return load(path)
    except ConfigError as e:
        print(f"swarm-aggregator: bad config: {e}", file=sys.stderr)
        raise SystemExit(2) from None


async def serve(cfg: Config) -> int:
    """Run the worker on `cfg` until SIGINT or SIGTERM; 0 on a clean stop."""
    from transports import create

    from ..metrics import Metrics, MetricsServer
    from ..worker import Worker

    metrics = Metrics(max_models=cfg.metrics.max_models)
    worker: Worker | None = None

    def on_reject(reason: str, detail: str) -> None:
        if worker is not None:
            worker.reject(reason, detail)

    transport = create(cfg, on_reject)
    worker = Worker(cfg, transport, metrics)
    metrics.transport_events.source = getattr(transport, "counters", None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = None
    # /readyz answers 200 only once the start-up line is out: whoever waits on it (a probe,
    # a script, a test) then finds the line in the log, not on the far side of a race.
    announced = threading.Event()
    if cfg.metrics.port:
        server = MetricsServer(metrics, cfg.metrics.host, cfg.metrics.port,
                               lambda: announced.is_set() and bool(transport.ready)).start()
    started = asyncio.Event()

    async def announce() -> None:
        # Only once the transport is up: a start that fails says so in one line, alone.
        await started.wait()
        log.info("swarm-aggregator %s: %s metrics=%s", __version__, cfg.describe(),
                 f"http://{cfg.metrics.host}:{server.port}/metrics" if server else "off")
        announced.set()

    announcing = asyncio.create_task(announce())
    try:
        await worker.run(stop, started)
    finally:
        announcing.cancel()
        if server is not None:
            server.close()
    log.info("stopped after %d actions", worker.published)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    _setup_logging(cfg.log.level)
    try:
        return asyncio.run(serve(cfg))
    except ConfigError as e:
        print(f"swarm-aggregator: bad config: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"swarm-aggregator: cannot start: {e}", file=sys.stderr)
        return 1


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    print(f"ok: {cfg.describe()}")
    return 0


@contextmanager
def _stop_on_signals(on_stop: Callable[[], object]) -> Iterator[None]:
    """Within the block, SIGINT (Ctrl-C) and SIGTERM call `on_stop`; a second one quits at once.

    The default SIGINT handler raises KeyboardInterrupt wherever the main thread happens to
    be (inside the event loop, a log call, a socket's close), which no code can stop from in
    order; a flag that the command's loops poll can. `on_stop` runs in the main thread
    between two bytecodes, so it must not take a lock that the main thread may hold: setting
    a threading.Event that only other code polls (is_set) is safe. The second signal is the
    way out of a stop that hangs: exit 128 + signal number at once, without cleanup.
    """
    stops = 0

    def handler(signum: int, frame: object) -> None:
        nonlocal stops
        stops += 1
        if stops > 1:
            os.write(2, b"\nswarm-aggregator: interrupted again, quitting without cleanup\n")
            os._exit(128 + signum)
        on_stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def cmd_proxy(args: argparse.Namespace) -> int:
    import zmq

    ctl: zmq.Socket[bytes] | None = None  # our end of the proxy's control pair, once connected
    stopping = False

    def stop() -> None:
        # Runs in the main thread (see below), the only user of `ctl`. A TERMINATE sent
        # before the proxy starts waits for it; `stopping` covers the time before `ctl`.
        nonlocal stopping
        stopping = True
        if ctl is not None:
            try:
                ctl.send(b"TERMINATE", zmq.NOBLOCK)
            except zmq.Again:
                pass  # one TERMINATE already waits

    with _stop_on_signals(stop):
        _setup_logging("INFO")
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        xsub = ctx.socket(zmq.XSUB)
        xpub = ctx.socket(zmq.XPUB)
        control = ctx.socket(zmq.PAIR)
        sender = ctx.socket(zmq.PAIR)
        try:
            xsub.bind(args.xsub)
            xpub.bind(args.xpub)
            address = f"inproc://proxy-control-{os.getpid()}"
            control.bind(address)
            sender.connect(address)  # inproc: connected once this returns
            ctl = sender
            log.info("proxy: publishers connect to %s, subscribers to %s",
                     xsub.getsockopt_string(zmq.LAST_ENDPOINT),
                     xpub.getsockopt_string(zmq.LAST_ENDPOINT))
            # zmq_proxy is a C loop: a signal that lands between two of its polls is noted
            # but its Python handler never runs, and the proxy never returns. So the proxy
            # runs in a thread that blocks SIGINT and SIGTERM (created with them blocked,
            # so none lands in it even at its start), and the signals reach this thread,
            # whose join() lets handlers run.
            blocked = {signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
            try:
                forward = threading.Thread(target=zmq.proxy_steerable, name="zmq-proxy",
                                           args=(xsub, xpub, None, control), daemon=True)
                if not stopping:
                    forward.start()
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
            if forward.ident is not None:  # started
                forward.join()
        finally:
            ctl = None
            for sock in (xsub, xpub, control, sender):
                sock.close(0)
        log.info("proxy: stopped")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    stop = threading.Event()
    with _stop_on_signals(stop.set):
        from .demo import run_demo

        _setup_logging("WARNING")
        return run_demo(models=args.models, actions=args.actions, steps=args.steps,
                        batch=args.batch, seed=args.seed, quiet=args.quiet, stop=stop)


def cmd_swergio_server(args: argparse.Namespace) -> int:
    stop = threading.Event()
    with _stop_on_signals(stop.set):
        from .swergio_server import ServerConfig, run_server

        cfg = ServerConfig(host=args.host, port=args.port, header_length=args.header_length,
                           max_message_bytes=args.max_message_bytes,
                           max_buffer_bytes=args.max_buffer_bytes,
                           logging_room=not args.no_logging_room)
        try:
            cfg.check()
        except ValueError as e:
            print(f"swarm-aggregator swergio-server: {e}", file=sys.stderr)
            return 2
        _setup_logging("INFO")
        return run_server(cfg, stop)


def cmd_keys(args: argparse.Namespace) -> int:
    from transports.zeromq import generate_keys

    public, secret = generate_keys(args.dir, args.name)
    print(f"public key (give to the other side): {public}\n"
          f"secret key (keep; only this process reads it): {secret}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .study import run_study

    run_study(steps=args.steps, actions=args.actions, batch=args.batch, good=args.good,
              noisy=args.noisy, adversarial=args.adversarial, seed=args.seed,
              png=args.png or None, json_path=args.json, markdown=args.markdown)
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from .top import run_top

    return run_top(args.url, interval=args.interval, window=args.window, once=args.once,
                   top=args.top)


def cmd_loadgen(args: argparse.Namespace) -> int:
    # SIGTERM too: as a container's first process, it would otherwise be ignored.
    stop = threading.Event()
    with _stop_on_signals(stop.set):
        from .loadgen import run_loadgen

        return run_loadgen(args.pub, args.sub, models=args.models, actions=args.actions,
                           batch=args.batch, rate=args.rate, skip=args.skip,
                           bad_rate=args.bad_rate, get_every=args.get_every,
                           env_id=args.env_id, duration=args.duration, seed=args.seed,
                           wait=args.wait, quiet=args.quiet, stop=stop)


def _swarm_options(p: argparse.ArgumentParser) -> None:
    """The simulated swarm's shape, as the demo and the load generator take it."""
    p.add_argument("--models", type=int, default=8, help="simulated models M (default 8)")
    p.add_argument("--actions", type=int, default=6, help="actions A (default 6)")
    p.add_argument("--batch", type=int, default=1,
                   help="environments stepping together, B (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of models and environment")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swarm-aggregator",
        description="Aggregates the action logits of a swarm of RL policies into one action "
                    "per environment step, over swergio, ZeroMQ, NATS JetStream (several "
                    "workers) or an in-process bus.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run the worker until SIGINT/SIGTERM",
                       description="Run the aggregation worker on the configured transport "
                                   "until SIGINT or SIGTERM.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("-c", "--config", help="TOML config file (optional)")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="the worker, simulated models and a toy environment",
                       description="Start the worker, M simulated models of different skill "
                                   "and a toy environment, over ZeroMQ on loopback; show "
                                   "progress; end with the contribution leaderboard.")
    _swarm_options(d)
    d.add_argument("--steps", type=int, default=0,
                   help="stop after this many steps (default 0: until Ctrl-C)")
    d.add_argument("--quiet", action="store_true", help="no live progress line")
    d.set_defaults(func=cmd_demo)

    x = sub.add_parser("proxy", help="ZeroMQ XSUB/XPUB proxy for many-to-many pipelines",
                       description="Run ZeroMQ's XSUB/XPUB proxy: every publisher (models, "
                                   "the worker's PUB) connects to --xsub, every subscriber "
                                   "(the worker's SUB, the environment) to --xpub.")
    x.add_argument("--xsub", default="tcp://127.0.0.1:5557",
                   help="where publishers connect (default %(default)s)")
    x.add_argument("--xpub", default="tcp://127.0.0.1:5558",
                   help="where subscribers connect (default %(default)s)")
    x.set_defaults(func=cmd_proxy)

    w = sub.add_parser("swergio-server", help="a swergio 0.0.2 room server without the stalls",
                       description="Serve swergio 0.0.2's rooms (REGISTER, JOINROOM, "
                                   "LEAVEROOM, DISCONNECT, _command, _logging; routing by "
                                   "TO_ROOM and TO) to unchanged swergio clients: in place of "
                                   "the example's 01_server.py. Each frame goes out in one "
                                   "write with TCP_NODELAY, TCP_QUICKACK before each read; a "
                                   "client that stops reading is disconnected past "
                                   "--max-buffer-bytes, never waited for. Until Ctrl-C or "
                                   "SIGTERM.")
    w.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s; the protocol has no "
                        "authentication: keep it on loopback or a private network)")
    w.add_argument("--port", type=int, default=8080,
                   help="port (default %(default)s, the example's; 0 = any free port)")
    w.add_argument("--header-length", type=int, default=10,
                   help="bytes of the frame header, as the clients' (default %(default)s)")
    w.add_argument("--max-message-bytes", type=int, default=16 * 1024 * 1024,
                   help="larger frames are read and thrown away, counted (default "
                        "%(default)s, the worker's limits.max_message_bytes)")
    w.add_argument("--max-buffer-bytes", type=int, default=64 * 1024 * 1024,
                   help="unread bytes a client may owe before it is disconnected "
                        "(default %(default)s)")
    w.add_argument("--no-logging-room", action="store_true",
                   help="do not copy DATA/FORWARD and DATA/GRADIENT messages into the room "
                        "_logging (swergio's Server(enable_logging=False))")
    w.set_defaults(func=cmd_swergio_server)

    k = sub.add_parser("keys", help="generate a CurveZMQ key pair",
                       description="Write NAME.key (public) and NAME.key_secret (secret) into "
                                   "DIR. The worker's secret file goes in "
                                   "transport.zmq.curve_secret_file; each peer's public file "
                                   "goes in the folder transport.zmq.curve_clients_dir.")
    k.add_argument("--dir", default="keys", help="folder for the files (default %(default)s)")
    k.add_argument("--name", default="worker", help="file name stem (default %(default)s)")
    k.set_defaults(func=cmd_keys)

    n = sub.add_parser("nats", help="NATS helpers: setup, get, peek, status, drive",
                       description="Operations on the NATS JetStream set-up: create the "
                                   "streams and consumers (setup), sum every worker's "
                                   "contribution (get), and more; see "
                                   "'swarm-aggregator nats --help'.", add_help=False)
    # (main hands `nats ...` to the helper's own command line before this parser runs;
    # the entry is here for --help)
    n.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the NATS helper")

    s = sub.add_parser("study", help="compare the aggregation rules on a mixed swarm",
                       description="Run the demo's toy environment, without a transport, "
                                   "with good, noisy and adversarial models under every "
                                   "aggregation rule; report reward and how well each "
                                   "rule's contribution ranking matches true quality.")
    s.add_argument("--steps", type=int, default=3000, help="steps per rule (default 3000)")
    s.add_argument("--actions", type=int, default=6, help="actions A (default 6)")
    s.add_argument("--batch", type=int, default=1, help="environments per step (default 1)")
    s.add_argument("--good", type=int, default=4, help="good models (default 4)")
    s.add_argument("--noisy", type=int, default=4, help="noisy models (default 4)")
    s.add_argument("--adversarial", type=int, default=2, help="adversarial models (default 2)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--png", default="study.png",
                   help="plot file (needs matplotlib; '' for none; default %(default)s)")
    s.add_argument("--json", help="also write the figures as JSON to this file")
    s.add_argument("--markdown", action="store_true",
                   help="print the table as Markdown, as the README shows it")
    s.set_defaults(func=cmd_study)

    t = sub.add_parser("top", help="live terminal view of a worker's /metrics",
                       description="Scrape a worker's /metrics every interval and show "
                                   "throughput, latency, window outcomes, rejections and "
                                   "the contribution leaderboard.")
    t.add_argument("url", nargs="?", default="http://127.0.0.1:9464/metrics",
                   help="the worker's metrics URL or host:port (default %(default)s)")
    t.add_argument("-n", "--interval", type=float, default=1.0,
                   help="seconds between scrapes (default 1)")
    t.add_argument("--window", type=float, default=5.0,
                   help="rates and quantiles over this many seconds (default 5)")
    t.add_argument("--top", type=int, default=15, help="models shown (default 15)")
    t.add_argument("--once", action="store_true", help="print one view and exit")
    t.set_defaults(func=cmd_top)

    g = sub.add_parser("loadgen", help="simulated models and environment for a running worker",
                       description="Drive a running worker over ZeroMQ: M simulated models "
                                   "publish logits keyed by ENV_ID and STEP at a fixed rate "
                                   "(the worker needs window.key = [\"ENV_ID\", \"STEP\"]), "
                                   "with optional skipped steps and faulty messages.")
    g.add_argument("--pub", default="tcp://127.0.0.1:5555",
                   help="where our PUB connects: the worker's SUB or a proxy's XSUB "
                        "(default %(default)s)")
    g.add_argument("--sub", default="tcp://127.0.0.1:5556",
                   help="where our SUB connects: the worker's PUB or a proxy's XPUB "
                        "(default %(default)s)")
    _swarm_options(g)
    g.add_argument("--rate", type=float, default=100.0, help="steps per second (default 100)")
    g.add_argument("--skip", type=float, default=0.0,
                   help="probability that a model skips a step: partial windows (default 0)")
    g.add_argument("--bad-rate", type=float, default=0.0,
                   help="faulty messages per second: rejections (default 0)")
    g.add_argument("--get-every", type=float, default=0.0,
                   help="send the evolution GET every this many seconds (default 0: never)")
    g.add_argument("--env-id", default="env-0", help="our ENV_ID (default %(default)s)")
    g.add_argument("--duration", type=float, default=0.0,
                   help="stop after this many seconds (default 0: until Ctrl-C or SIGTERM)")
    g.add_argument("--wait", type=float, default=0.0,
                   help="give up if no worker answers within this many seconds (default 0: "
                        "wait forever)")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    g.set_defaults(func=cmd_loadgen)

    c = sub.add_parser("check-config", help="validate a config file and print its summary",
                       description="Load the config (file plus SWARM_AGG__* variables), "
                                   "validate it, print a summary; exit 2 naming the bad key.")
    c.add_argument("-c", "--config", help="TOML config file")
    c.set_defaults(func=cmd_check_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["nats"]:  # its own command line, options included
        from transports.nats.admin import main as nats_main

        return nats_main(argv[1:])
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
