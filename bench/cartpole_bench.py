"""cartpole section (opt-in: `python -m bench --only cartpole`, or on its own:
`python -m bench.cartpole_bench [--quick] [--repeats N]`).

The CartPole example (`python -m examples.cartpole_swarm`) end to end, as a user runs it,
on each transport: M = 6 Stable-Baselines3 A2C models, each its own process, each trained
every 5 steps (as the swergio RLGym example's models are), one CartPole-v1 environment,
one step in flight (lockstep: the environment waits for each action), an evolution round
every 500 steps. Figure: steps/s after the first 50 steps (the start-up, SB3's imports
included, is left out; the evolution rounds are in), and the CPU time of all the run's
processes per step (what the steps cost whatever else the machine runs). Beside it, the
vectorised variant: B = 16 environments per step (16 rows of logits per message), in
environment steps/s.

The swergio RLGym example itself, on the same kind of machine: 6.6-7.2 steps/s with 6
models (`python -m bench --only swergio_server`, set-up a, torch models). Needs the `rl`
extra (gymnasium, stable-baselines3), which `make install` installs.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import report
from .common import ROOT, BenchError, Plan, stat

TRANSPORTS = ("zmq", "nats", "swergio")
MODELS = 6
TRAIN_EVERY = 5
BATCH = 16
SWERGIO_EXAMPLE_STEPS_PER_S = (6.6, 7.2)  # measured on this machine (see the docstring)
RUN_TIMEOUT_S = 600.0


def steps_for(plan: Plan) -> tuple[int, int]:
    """Steps per run with B = 1 and with B = 16: short under `--quick`."""
    quick = plan.lockstep_steps <= Plan.quick().lockstep_steps
    return (300, 150) if quick else (3000, 1000)


def run_example(transport: str, envs: int, steps: int) -> dict[str, Any]:
    """One run of the example; its summary (figures as the example computes them)."""
    with tempfile.TemporaryDirectory(prefix="bench-cartpole-") as tmp:
        summary = Path(tmp) / "summary.json"
        argv = [sys.executable, "-m", "examples.cartpole_swarm", "--transport", transport,
                "--models", str(MODELS), "--train-every", str(TRAIN_EVERY), "--envs",
                str(envs), "--steps", str(steps), "--quiet", "--summary", str(summary)]
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the example stops its processes in order
            out, _ = proc.communicate(timeout=30)
            raise BenchError(f"cartpole on {transport}, B = {envs}: still running after "
                             f"{RUN_TIMEOUT_S:g} s\n{out[-2000:]}") from None
        if proc.returncode != 0 or not summary.exists():
            raise BenchError(f"cartpole on {transport}, B = {envs}: exit {proc.returncode}"
                             f"\n{out[-2000:]}")
        result: dict[str, Any] = json.loads(summary.read_text())
    if result["answered"] != result["steps"]:
        raise BenchError(f"cartpole on {transport}: {result['answered']} of "
                         f"{result['steps']} steps answered")
    return result


def section(plan: Plan) -> dict[str, Any]:
    steps, steps_batch = steps_for(plan)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {
        (t, b): [] for t in TRANSPORTS for b in (1, BATCH)}
    for _ in range(plan.repeats):
        for t in TRANSPORTS:
            runs[(t, 1)].append(run_example(t, 1, steps))
            runs[(t, BATCH)].append(run_example(t, BATCH, steps_batch))
    rows = []
    for (t, b), rs in runs.items():
        rows.append({
            "transport": t, "envs": b, "steps": rs[0]["steps"],
            "steps_per_s": stat([r["warm_steps_per_s"] for r in rs]),
            "env_steps_per_s": stat([r["warm_steps_per_s"] * b for r in rs]),
            "start_s": stat([r["start_seconds"] for r in rs]),
            # CPU of every process of the run per step: what an idle machine's cores
            # would have to give, however busy this one is.
            "cpu_ms_per_step": stat([r["cpu_ms_per_step"]["total"] for r in rs]),
            "cpu_ms_per_step_by_role": {
                k: stat([r["cpu_ms_per_step"][k] for r in rs])["median"]
                for k in rs[0]["cpu_ms_per_step"] if k != "total"},
            "partial": sum(r["partial"] for r in rs), "rounds": sum(r["rounds"] for r in rs)})
    return {"config": {"models": MODELS, "train_every": TRAIN_EVERY, "algo": "a2c",
                       "batch": BATCH, "warmup": 50, "evolve_every": 500,
                       "swergio_example_steps_per_s": list(SWERGIO_EXAMPLE_STEPS_PER_S)},
            "rows": rows}


def render(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    low = c["swergio_example_steps_per_s"][1]
    rows = []
    for row in r["rows"]:
        ratio = "" if row["envs"] != 1 else f"{row['steps_per_s']['median'] / low:.0f}x"
        rows.append([row["transport"], str(row["envs"]), report.fig(row["steps_per_s"]),
                     report.fig(row["env_steps_per_s"]), ratio,
                     report.fig(row["cpu_ms_per_step"]), report.fig(row["start_s"]),
                     str(row["partial"])])
    return [(f"cartpole: the example end to end, M={c['models']} SB3 {c['algo'].upper()} "
             f"models trained every {c['train_every']} steps, lockstep, after "
             f"{c['warmup']} warm-up steps; swergio RLGym example: "
             f"{c['swergio_example_steps_per_s'][0]}-{low} steps/s"),
            *report.table(["transport", "B", "steps/s", "env steps/s", "vs example",
                           "CPU ms/step", "start s", "partial"], rows)]


# The suite's table finds each section's renderer here; this one is registered by its own
# module, which the suite imports before it runs the section.
report.RENDER.setdefault("cartpole", render)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cartpole_bench",
                                description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int)
    args = p.parse_args(argv)
    plan = (Plan.quick() if args.quick else Plan()).with_repeats(args.repeats)
    result = section(plan)
    print("\n".join(render(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
