"""`python -m examples.cartpole_swarm`: a swarm of Stable-Baselines3 policies on CartPole.

Starts, on 127.0.0.1: the transport's own process (ZeroMQ's proxy, a nats-server or the
swergio server), the worker (`swarm-aggregator run`, the real one), M model processes
(SB3 A2C or PPO, training every 5 steps), and runs the environment (Gymnasium
CartPole-v1, B of them with `--envs B`) and the evolution loop in this process. Prints
progress (steps/s, episode rewards, evolution rounds), then the contribution leaderboard;
`--summary FILE` also writes the figures as JSON. Ctrl-C ends the steps early and still
prints the leaderboard. Exit 0 when every step was answered and every process stopped
cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .common import ALGOS, EVOLVE, TRANSPORTS, model_ids
from .environment import REWARD_WINDOW, Result, Runner, leaderboard
from .launch import (
    Processes,
    RunError,
    start_models,
    start_transport,
    start_worker,
    stop_quietly,
    worker_config,
    write_config,
)

START_TIMEOUT_S = 120.0  # SB3's imports take a while on a busy 2-core machine


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m examples.cartpole_swarm",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--transport", choices=TRANSPORTS, default="zmq",
                   help="zmq (default: no broker, ZeroMQ's proxy), nats or swergio")
    p.add_argument("--models", type=int, default=6, help="M, model processes (default 6)")
    p.add_argument("--steps", type=int, default=3000,
                   help="swarm steps; 0 = until Ctrl-C (default 3000)")
    p.add_argument("--envs", type=int, default=1,
                   help="B, CartPole environments stepping together (default 1)")
    p.add_argument("--train-every", type=int, default=5,
                   help="each model's update interval in steps: its rollout (default 5)")
    p.add_argument("--algo", choices=ALGOS, default="a2c", help="SB3 algorithm (default a2c)")
    p.add_argument("--evolve-every", type=int, default=500,
                   help="an evolution round every this many steps; 0 = none (default 500)")
    p.add_argument("--evolve", choices=EVOLVE, default="copy",
                   help="what a round does: copy the best model's weights to the worst, "
                        "set the worker's aggregation weights by rank, or both")
    p.add_argument("--eval-steps", type=int, default=50,
                   help="a round ranks the models on this many steps before it, taken with "
                        "argmax actions; 0 = on all steps since the last round, as the RLGym "
                        "example does (default 50)")
    p.add_argument("--noise", type=float, default=0.01,
                   help="std of the Gaussian noise added to copied weights (default 0.01)")
    p.add_argument("--deterministic", action="store_true",
                   help="argmax actions (default: sampled, as in training)")
    p.add_argument("--warmup", type=int, default=50,
                   help="steps left out of the warm steps/s figure (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summary", type=Path, help="write the run's figures here as JSON")
    p.add_argument("--logs", type=Path,
                   help="keep each process's output and the config in this folder (default: "
                        "a temporary one, removed at the end)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines: the start line and the final lines only")
    args = p.parse_args(argv)
    for name in ("models", "envs", "train_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.steps, args.evolve_every, args.eval_steps, args.warmup, args.noise) < 0:
        p.error("--steps, --evolve-every, --eval-steps, --warmup and --noise must not be "
                "negative")
    if args.evolve_every and args.eval_steps >= args.evolve_every:
        p.error("--eval-steps must be fewer than --evolve-every")
    if args.train_every * args.envs < 2:
        p.error("a rollout needs at least 2 transitions (--train-every x --envs)")
    return args


@contextmanager
def ctrl_c(stop: threading.Event) -> Iterator[None]:
    """The first Ctrl-C ends the steps (the run then stops in order); a second one quits."""
    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def summary(args: argparse.Namespace, res: Result, runner: Runner, started_s: float,
            exits: dict[str, int]) -> dict[str, Any]:
    evo = runner.evolution
    recent = res.episodes[-REWARD_WINDOW:]
    return {
        "transport": args.transport, "models": args.models, "envs": args.envs,
        "algo": args.algo, "train_every": args.train_every, "steps": res.steps,
        "answered": res.answered, "partial": res.partial, "env_steps": res.steps * args.envs,
        "seconds": round(res.seconds, 3), "start_seconds": round(started_s, 3),
        "steps_per_s": res.steps / res.seconds if res.seconds else 0.0,
        "env_steps_per_s": res.steps * args.envs / res.seconds if res.seconds else 0.0,
        "warm_steps_per_s": res.warm_steps / res.warm_seconds if res.warm_seconds else None,
        "episodes": len(res.episodes),
        "reward_last": sum(recent) / len(recent) if recent else None,
        "rounds": len(res.rounds), "copies": sum(1 for r in res.rounds if r.copied),
        "contribution": evo.total, "contribution_sum": sum(evo.total.values()),
        "report_steps": evo.steps, "models_done": runner.byes, "exits": exits,
        "stopped": res.stopped,
    }


def headline(args: argparse.Namespace, words: str) -> str:
    steps = f"{args.steps} steps" if args.steps else "steps until Ctrl-C"
    if not args.evolve_every:
        evolution = "none"
    else:
        basis = (f"the last {args.eval_steps} steps (argmax)" if args.eval_steps
                 else "all steps since the last round")
        act = {"copy": "copy the best one's weights to the worst",
               "weights": "set the worker's aggregation weights by rank",
               "both": "copy the best one's weights to the worst and set the worker's "
                       "aggregation weights by rank"}[args.evolve]
        evolution = f"every {args.evolve_every} steps, rank the models on {basis} and {act}"
    envs = "1 CartPole-v1 environment" if args.envs == 1 else \
        f"{args.envs} CartPole-v1 environments per step"
    return (f"cartpole swarm: {args.models} {args.algo.upper()} models (an update every "
            f"{args.train_every} steps), {envs}, {steps}\n"
            f"transport: {words}\n"
            f"evolution: {evolution} (Ctrl-C stops)")


def run(args: argparse.Namespace, folder: Path, stop: threading.Event) -> dict[str, Any]:
    from processor.client import connect

    out = None if args.quiet else sys.stdout
    ids = model_ids(args.models)
    procs = Processes(folder)
    t_start = time.monotonic()
    try:
        transport, words = start_transport(args.transport, procs)
        config = write_config(folder, worker_config(transport, args.models, args.seed))
        start_worker(procs, config)
        models = start_models(procs, config, ids, args.envs, args.train_every, args.algo,
                              args.seed)
        print(headline(args, words), flush=True)
        with connect(config, name="environment") as swarm:
            runner = Runner(swarm, ids, args.envs, args.seed, args.evolve, args.noise,
                            args.eval_steps, out, procs.check, stop)
            runner.handshake(START_TIMEOUT_S)
            started = time.monotonic() - t_start
            if out is not None:
                print(f"ready in {started:.1f} s: worker and {args.models} models answer",
                      flush=True)
            marks: list[dict[str, float]] = []
            res = runner.run(args.steps, args.evolve_every, args.warmup, args.deterministic,
                             mark=lambda: marks.append(procs.cpu_seconds()))
            runner.finish()
        exits = {m.name: stop_quietly(m, 10.0) for m in models}
        exits.update({c.name: c.stop() for c in reversed(procs.children) if c not in models})
    finally:
        procs.stop_all()
    return report(args, res, runner, started, exits, cpu_per_step(marks, res.warm_steps))


def cpu_per_step(marks: list[dict[str, float]], steps: int) -> dict[str, float]:
    """CPU milliseconds per step after the warm-up, by role: the models together, the
    worker, the transport's process, the launcher (environment and evolution)."""
    if len(marks) != 2 or not steps:
        return {}
    a, b = marks
    out: dict[str, float] = {}
    for name in a.keys() & b.keys():
        role = "models" if name.startswith("model-") else name
        out[role] = out.get(role, 0.0) + 1000 * (b[name] - a[name]) / steps
    out["total"] = sum(out.values())
    return out


def report(args: argparse.Namespace, res: Result, runner: Runner, started: float,
           exits: dict[str, int], cpu: dict[str, float]) -> dict[str, Any]:
    s = summary(args, res, runner, started, exits)
    s["cpu_ms_per_step"] = cpu
    print(f"\n{res.steps} steps in {res.seconds:.1f} s: {s['steps_per_s']:.1f} steps/s, "
          f"{s['env_steps_per_s']:.1f} environment steps/s (B = {args.envs})"
          + (f"; after {args.warmup} warm-up steps {s['warm_steps_per_s']:.1f} steps/s"
             if s["warm_steps_per_s"] else ""))
    reward = f"{s['reward_last']:.1f}" if s["reward_last"] is not None else "-"
    print(f"episodes: {s['episodes']}, mean reward of the last {REWARD_WINDOW}: {reward}")
    if cpu:
        # A fixed order (the transport's process between the worker and the launcher),
        # so that runs compare line by line.
        rank = {"models": 0, "worker": 1, "launcher": 3}
        parts = ", ".join(f"{k} {cpu[k]:.2f}" for k in sorted(
            (k for k in cpu if k != "total"), key=lambda k: (rank.get(k, 2), k)))
        print(f"CPU per step: {cpu['total']:.2f} ms over all processes ({parts})")
    print(f"every step answered: {res.answered} of {res.steps} actions, {res.partial} "
          f"partial; evolution rounds: {s['rounds']} ({s['copies']} copies)")
    print(f"contribution leaderboard (the worker's GETs over the run; they sum to "
          f"{s['contribution_sum']:.1f} for {s['env_steps']} environment steps):")
    for line in leaderboard(runner.evolution, runner.byes):
        print(line)
    bad = {k: v for k, v in exits.items() if v != 0}
    if bad:
        print(f"processes that did not exit 0: {bad}")
    return s


def problems(s: dict[str, Any], models: list[str]) -> list[str]:
    """What makes a run a failure: steps not answered, a model that did not report at its
    end, a process that did not exit 0."""
    out = []
    if s["answered"] != s["steps"]:
        out.append(f"{s['steps'] - s['answered']} steps not answered")
    silent = sorted(set(models) - set(s["models_done"]))
    if silent:
        out.append(f"no report (BYE) from {', '.join(silent)}")
    bad = {k: v for k, v in s["exits"].items() if v != 0}
    if bad:
        out.append(f"exit codes {bad}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        stack.enter_context(ctrl_c(stop))
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            folder = args.logs
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="cartpole-swarm-")))
        try:
            s = run(args, folder, stop)
        except (RunError, TimeoutError, RuntimeError) as e:
            print(f"cartpole swarm: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # a second Ctrl-C: the processes are stopped, no report
            print("cartpole swarm: interrupted", file=sys.stderr)
            return 130
    if args.summary:
        args.summary.write_text(json.dumps(s, indent=2) + "\n")
    failed = problems(s, model_ids(args.models))
    if failed:
        print(f"cartpole swarm: failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
