"""`python -m bench`: the benchmark suite; prints a table, writes bench/results/latest.json.

Sections (all by default, in this order; `--only a,b` picks some):

- zmq_lockstep      the worker on ZeroMQ, lockstep, M = 20, A = 2, 18, 1000 (and binary
                    frames at 1000): steps/s and latency (last publish -> action), next
                    to a ZeroMQ ping-pong and the worker's transport alone; where the
                    latency goes.
- zmq_pipelined     keyed windows, K windows in flight, JSON and binary logits, A = 18 and
                    1000: sustained logits messages/s, steps/s, losses, next to a bare
                    receiver (recv_multipart + orjson.loads, + np.frombuffer).
- swergio_lockstep  the worker on the swergio 0.0.2 server, next to the swergio example's
                    aggregator and a no-math echo component on the same server.
- metrics           zmq_lockstep and zmq_pipelined (A = 18) with the metrics server on
                    (and scraped) against SWARM_AGG__METRICS__PORT=0.
- kernel            SumProbs per window (1 vs 64, 256 windows per call) and the decoding
                    cost per message, in this process.
- cost              instructions per window (valgrind) over a fixed in-process workload,
                    and the worker's CPU time per window (/proc) over a fixed one.
- nats              NATS JetStream, one worker, beside the worker on ZeroMQ in each repeat
                    (`bench.nats_bench`, 8 models, A = 18, 64 windows in flight): steps/s,
                    latency, CPU per step of the worker, the nats-server and the driver;
                    with --nats-before (or --before, when that checkout has the nats
                    package), the earlier checkout's NATS worker on its own server
                    (about 15 s a repeat; --quick: one repeat of 2 s).

Then issue 14's targets, each with the ratio this run measured (`bench.targets`).
`--before DIR` measures the worker of another checkout beside this one.

Opt-in (only with `--only`; minutes each):

- swergio_server    round trips of two unchanged swergio clients through the swergio 0.0.2
                    server and `swarm-aggregator swergio-server`; the RLGym example's
                    pipeline (environment, 6 models, evolution) with (a) the original
                    server and aggregator, (b) the original server and the worker, (c)
                    our server and the worker: steps/s side by side.
- cartpole          the CartPole example (examples/cartpole_swarm, the rl extra) end to
                    end on ZeroMQ, NATS and swergio: 6 SB3 models trained every 5 steps,
                    steps/s; 16 environments per step, environment steps/s (about 10 minutes).

Every figure is the median of `--repeats` runs with its min-max. Everything runs on
127.0.0.1 with ports chosen at run time; every process started is stopped at the end.
`--quick` is a tiny configuration (one repeat, few steps) for a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import report, targets
from .common import ROOT, Plan, stop_on_sigterm

SECTIONS = ("zmq_lockstep", "zmq_pipelined", "swergio_lockstep", "metrics", "kernel", "cost",
            "nats")
OPT_IN = ("swergio_server", "cartpole")  # run only when named in --only
DEFAULT_OUT = ROOT / "bench" / "results" / "latest.json"


def _runner(name: str) -> Callable[[Plan], dict[str, Any]]:
    if name == "zmq_lockstep":
        from .zmq_wire import lockstep_section
        return lockstep_section
    if name == "zmq_pipelined":
        from .zmq_wire import pipelined_section
        return pipelined_section
    if name == "cost":
        from .cost_bench import cost_section
        return cost_section
    if name == "metrics":
        from .zmq_bench import metrics_section
        return metrics_section
    if name == "swergio_server":
        from .swergio_server_bench import section as swergio_server_section
        return swergio_server_section
    if name == "cartpole":
        from .cartpole_bench import section as cartpole_section
        return cartpole_section
    if name == "nats":
        from .nats_bench import render, section
        report.RENDER.setdefault("nats", render)  # its table, beside the others'
        return section
    if name == "swergio_lockstep":
        from .swergio_bench import lockstep_section as swergio_section
        return swergio_section
    from .kernel_bench import kernel_section
    return kernel_section


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("zmq", "orjson", "numpy", "torch", "prometheus_client"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except ImportError:
            out[mod] = "missing"
    try:
        import zmq

        out["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        out["swergio"] = version("swergio")
    except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
        out["swergio"] = "missing"
    return out


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def _meta(plan: Plan, quick: bool) -> dict[str, Any]:
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": quick,
            "plan": {k: list(v) if isinstance(v, tuple) else v
                     for k, v in plan.__dict__.items()},
            "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                     "loadavg_start": list(os.getloadavg())},
            "versions": _versions(), "git": _git()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny configuration: one repeat, few steps, small sizes")
    p.add_argument("--only", default="",
                   help=f"comma-separated sections to run (of: {', '.join(SECTIONS)}; "
                        f"opt-in: {', '.join(OPT_IN)})")
    p.add_argument("--repeats", type=int,
                   help="repeats of every figure (default 3, kernel and metrics 5; --quick 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="JSON output file (default %(default)s)")
    p.add_argument("--before", type=Path, metavar="DIR",
                   help="a checkout of an earlier commit (`git worktree add DIR REF`): its "
                        "worker is measured beside this one in the ZeroMQ, cost and nats "
                        "sections")
    p.add_argument("--nats-before", type=Path, metavar="DIR",
                   help="the checkout whose NATS worker the nats section measures beside "
                        "this one (default: --before's, if it has transports/nats)")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS + OPT_IN]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; valid: "
                f"{', '.join(SECTIONS + OPT_IN)}")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.before is not None and not (args.before / "processor" / "worker.py").is_file():
        p.error(f"--before {args.before}: not a checkout of this project")
    args.sections = [s for s in SECTIONS + OPT_IN if s in only] if only else list(SECTIONS)
    return args



def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    plan = (Plan.quick() if args.quick else Plan()).with_repeats(args.repeats)
    if args.before is not None:
        plan = dataclasses.replace(plan, before=str(args.before.resolve()))
    nats_before = args.nats_before
    if nats_before is None and args.before is not None and (
            args.before / "transports" / "nats").is_dir():
        nats_before = args.before
    if nats_before is not None:
        plan = dataclasses.replace(plan, nats_before=str(nats_before.resolve()))
    result: dict[str, Any] = {"meta": _meta(plan, args.quick), "sections": {}}
    t0 = time.monotonic()
    failed = False
    for name in args.sections:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t = time.monotonic()
        try:
            section = _runner(name)(plan)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one failed section must not hide the others
            traceback.print_exc()
            section = {"error": f"{type(e).__name__}: {e}"}
            failed = True
        section["seconds"] = round(time.monotonic() - t, 2)
        result["sections"][name] = section
        print(f"[bench] {name} done in {section['seconds']:.1f} s", file=sys.stderr,
              flush=True)
    result["meta"]["seconds"] = round(time.monotonic() - t0, 2)
    result["meta"]["host"]["loadavg_end"] = list(os.getloadavg())
    result["targets"] = targets.targets(result["sections"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    load = result["meta"]["host"]
    print(f"\nswarm-aggregator bench ({'quick' if args.quick else 'full'}, "
          f"{plan.repeats} repeat(s); median [min-max]; {load['cpus']} CPUs, load "
          f"{load['loadavg_start'][0]:.1f} -> {load['loadavg_end'][0]:.1f}; "
          f"{result['meta']['seconds']:.0f} s)\n")
    print(report.render(result["sections"]))
    if result["targets"]:
        print(targets.render(result["targets"]) + "\n")
    print(f"JSON: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
