"""Soak: steady pipelined load with random faults; memory and open windows plateau.

Runs about 40 s in `make test`; set SWARM_AGG_SOAK_SECONDS for a longer run, e.g.
`SWARM_AGG_SOAK_SECONDS=1800 .venv/bin/python -m pytest -s tests/test_soak.py`.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from tests.procs import cli, free_port, metric, process, rss_mb, worker_env, zmq_swarm
from tests.reference import sum_probs

SECONDS = float(os.environ.get("SWARM_AGG_SOAK_SECONDS", "40"))
pytestmark = pytest.mark.timeout(SECONDS + 120)

ENVS, MODELS, ACTIONS = 8, 4, 6


def test_soak_with_random_faults():
    sub, pub, mport = free_port(), free_port(), free_port()
    env = worker_env(transport__zmq__sub=f"tcp://127.0.0.1:{sub}",
                     transport__zmq__pub=f"tcp://127.0.0.1:{pub}", metrics__port=mport,
                     window__models=MODELS, window__key=["ENV_ID", "STEP"],
                     window__timeout_ms=100, window__min_models=2, window__max_open=256,
                     window__late_memory=4096, log__rate_limit_s=30)
    rng = np.random.default_rng(0)
    faults = {"missing_model": 0, "duplicate": 0, "garbage": 0, "late": 0}
    with process(cli("run"), env) as proc:
        peer = zmq_swarm(sub, pub, key=["ENV_ID", "STEP"])
        try:
            env = peer.environment()
            models = [peer.model(f"m{m}", deterministic=True) for m in range(MODELS)]
            samples: list[tuple[float, float, float]] = []  # (t, rss MiB, open windows)
            t0 = last_sample = time.monotonic()
            steps = answered = 0
            step = 0
            while time.monotonic() - t0 < SECONDS:
                expected = {}
                for e in range(ENVS):
                    x = rng.normal(0, 2, (MODELS, ACTIONS)).astype(np.float32)
                    senders = list(range(MODELS))
                    if rng.random() < 0.03:
                        senders.remove(int(rng.integers(MODELS)))   # a model misses a step
                        faults["missing_model"] += 1
                    for m in senders:
                        models[m].send(x[m], (e, step))
                        if rng.random() < 0.01:
                            models[m].send(x[m], (e, step))          # sent twice
                            faults["duplicate"] += 1
                    if rng.random() < 0.02:
                        peer.publish("logits", rng.bytes(int(rng.integers(1, 200))))
                        faults["garbage"] += 1
                    if step > 5 and rng.random() < 0.01:
                        models[0].send(x[0], (e, step - 5))
                        faults["late"] += 1
                    expected[e] = (sum_probs(x[senders][:, None, :])[1].tolist(),
                                   len(senders))
                steps += ENVS
                for e in range(ENVS):
                    out = env.wait((e, step), timeout=5)
                    assert out["STEP"] == step
                    action, n = expected.pop(out["ENV_ID"])
                    assert out["ACTION"] == action
                    assert out.get("MODELS", MODELS) == n
                    answered += 1
                step += 1
                now = time.monotonic()
                if now - last_sample >= SECONDS / 20:
                    last_sample = now
                    samples.append((now - t0, rss_mb(proc.pid),
                                    metric(mport, "swarm_aggregator_open_windows")))
            duration = time.monotonic() - t0
        finally:
            peer.close()
        assert proc.poll() is None
    assert answered == steps and steps > 1000
    assert all(f > 0 for f in faults.values()), faults
    third = len(samples) // 3
    early = max(r for _, r, _ in samples[third: 2 * third])
    late = max(r for _, r, _ in samples[2 * third:])
    print(f"\nsoak: {steps} steps in {duration:.0f} s ({steps / duration:.0f} steps/s), "
          f"faults {faults}, RSS start {samples[0][1]:.1f} MiB, middle {early:.1f} MiB, "
          f"end {samples[-1][1]:.1f} MiB, open windows max "
          f"{max(o for _, _, o in samples):.0f}")
    assert late - early < 10, samples          # memory plateaus
    assert max(o for _, _, o in samples) <= 256
