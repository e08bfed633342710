"""The CartPole example (examples/cartpole_swarm) end to end, on each transport.

Real components only: the launcher starts the transport's own process (ZeroMQ's proxy, a
nats-server, the swergio server), the worker (`swarm-aggregator run`), Stable-Baselines3
model processes and Gymnasium's CartPole, all on 127.0.0.1 with ports chosen at run time.
What is checked is the pipeline, not the learning: every step answered (none PARTIAL),
the contributions of the worker's GETs summing to the environment steps decided, every
model answering every observation and training every 5 steps, evolution rounds whose
weights were copied, and every process exiting 0. The launcher stops what it started; a
run that overstays gets SIGTERM (an orderly stop), then SIGKILL, and its children, told
to die with it, follow.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 120.0

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(autouse=True)
def rl_installed() -> None:
    missing = [m for m in ("gymnasium", "stable_baselines3") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"{missing} missing: the example needs the rl extra (`make install`, or "
                    "pip install -e '.[rl]')")


def run_example(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    """`python -m examples.cartpole_swarm ARGS`, to its end; its summary and its output."""
    summary = tmp_path / "summary.json"
    proc = subprocess.Popen([sys.executable, "-m", "examples.cartpole_swarm", *args, "--quiet",
                             "--summary", str(summary)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"still running after {RUN_TIMEOUT_S:g} s:\n{out[-3000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-3000:]}"
    return json.loads(summary.read_text()), out


def check_pipeline(s: dict[str, Any], out: str, models: int, steps: int, envs: int,
                   rounds: int, train_every: int = 5) -> None:
    ids = {f"model-{i}" for i in range(models)}
    assert (s["steps"], s["answered"], s["partial"]) == (steps, steps, 0), s
    # The worker's GETs (every round's, and the last one) cover every decision once.
    assert s["report_steps"] == steps * envs == s["env_steps"]
    assert set(s["contribution"]) == ids
    assert s["contribution_sum"] == pytest.approx(steps * envs, rel=1e-6)
    assert (s["rounds"], s["copies"]) == (rounds, rounds), s
    done = s["models_done"]
    assert set(done) == ids
    for m in done.values():
        assert m["STEPS"] == steps, m
        # A transition per step after the first, an update per full rollout; a model that
        # loaded copied weights dropped the transitions of its old ones (two updates at most
        # per copy).
        full = (steps - 1) // train_every
        assert full - 2 * m["LOADED"] <= m["UPDATES"] <= full, m
        if not m["LOADED"]:
            assert m["UPDATES"] == full, m
    assert sum(m["LOADED"] for m in done.values()) == rounds
    assert sum(m["SENT_WEIGHTS"] for m in done.values()) == rounds
    assert s["exits"] and not any(s["exits"].values()), s["exits"]
    assert "contribution leaderboard" in out and "model-0" in out


@pytest.mark.parametrize("transport", ["zmq", "nats", "swergio"])
def test_swarm_on_each_transport(tmp_path: Path, transport: str) -> None:
    s, out = run_example(tmp_path, "--transport", transport, "--models", "3", "--steps", "300",
                         "--evolve-every", "100", "--eval-steps", "20")
    check_pipeline(s, out, models=3, steps=300, envs=1, rounds=2)
    assert s["transport"] == transport and s["envs"] == 1


def test_vectorised_swarm_with_ppo(tmp_path: Path) -> None:
    """B = 4 environments per step (4 rows of logits per message, 4 actions back), PPO,
    and both evolution actions (weights copied, aggregation weights set by rank)."""
    s, out = run_example(tmp_path, "--envs", "4", "--models", "2", "--steps", "120",
                         "--algo", "ppo", "--evolve-every", "60", "--eval-steps", "10",
                         "--evolve", "both")
    check_pipeline(s, out, models=2, steps=120, envs=4, rounds=1)
    assert s["algo"] == "ppo" and s["episodes"] > 0
