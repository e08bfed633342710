"""The command line: demo, check-config, help, refusing a bad config."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from tests.procs import ROOT, cli

pytestmark = pytest.mark.timeout(120)


def run(*args: str, env: dict | None = None, timeout: float = 100) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(cli(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def leaderboard(stdout: str) -> list[tuple[str, float, float]]:
    rows = re.findall(r"^\s+\d+\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+%$", stdout, re.M)
    return [(name, float(skill), float(c)) for name, skill, c in rows]


@pytest.mark.parametrize("models,actions,batch", [(8, 6, 1), (20, 18, 3)])
def test_demo_ranks_the_skilled_models_first(models, actions, batch):
    r = run("demo", "--steps", "300", "--models", str(models), "--actions", str(actions),
            "--batch", str(batch), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "300 steps in" in r.stdout
    rows = leaderboard(r.stdout)
    assert len(rows) == models
    skills = [s for _, s, _ in rows]          # in leaderboard order
    assert skills[0] == max(skills)           # the best model ranks first
    upper_half = sorted(skills, reverse=True)[: models // 2]
    assert all(s in upper_half for s in skills[: max(1, models // 4)])
    # rank correlation between leaderboard position and true skill
    ranks = np.argsort(np.argsort(-np.array(skills)))
    rho = np.corrcoef(ranks, np.arange(models))[0, 1]
    assert rho > 0.8, (rho, rows)
    assert sum(c for _, _, c in rows) == pytest.approx(300 * batch, rel=1e-3)


def test_demo_shows_live_progress():
    r = run("demo", "--steps", "1500", "--models", "4")
    assert r.returncode == 0, r.stderr
    assert re.search(r"step \d+/1500\s+\d+ steps/s\s+latency p50 [\d.]+ ms p99 [\d.]+ ms",
                     r.stdout)


def test_demo_refuses_bad_flags():
    r = run("demo", "--models", "0")
    assert r.returncode == 2 and "--models" in r.stderr


def test_check_config_ok_and_bad(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[transport]\nkind = "swergio"\n[window]\nmodels = 20\n')
    r = run("check-config", "-c", str(good))
    assert r.returncode == 0 and "transport=swergio" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[window]\ntimeout_ms = "soon"\n')
    r = run("check-config", "-c", str(bad))
    assert r.returncode == 2 and "window.timeout_ms" in r.stderr
    r = run("check-config", env={"SWARM_AGG__TRANSPORT__KIND": "carrier-pigeon"})
    assert r.returncode == 2 and "transport.kind" in r.stderr and "zmq" in r.stderr


def test_run_refuses_a_bad_config_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[window]\nmodels = 20\nflavour = "x"\n')
    r = run("run", "-c", str(bad), timeout=30)
    assert r.returncode == 2 and "window.flavour" in r.stderr


@pytest.mark.parametrize("command", [[], ["run"], ["demo"], ["proxy"], ["check-config"]])
def test_help_is_useful(command):
    r = run(*command, "--help")
    assert r.returncode == 0
    assert "usage: swarm-aggregator" in r.stdout
    assert len(r.stdout.splitlines()) > 4


def test_the_installed_command_works_outside_the_source_tree(tmp_path):
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "swarm-aggregator"
    if not exe.exists():
        pytest.skip("swarm-aggregator is not installed next to this Python")
    r = subprocess.run([str(exe), "demo", "--steps", "50", "--quiet"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=100, check=False)
    assert r.returncode == 0, r.stderr
    assert "50 steps in" in r.stdout


def test_readyz_answers_only_after_the_start_up_line():
    # A probe, a script or the README's recipe waits on /readyz and then reads the log: the
    # start-up line must already be there (CI once found /readyz up and the log empty).
    import urllib.error
    import urllib.request

    from tests.procs import free_port, output, process, wait_for, worker_env

    sub, pub, mport = free_port(), free_port(), free_port()
    env = worker_env(transport__kind="zmq", transport__zmq__sub=f"tcp://127.0.0.1:{sub}",
                     transport__zmq__pub=f"tcp://127.0.0.1:{pub}", metrics__port=mport,
                     window__models=2)

    def ready() -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{mport}/readyz",
                                          timeout=5).status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    with process(cli("run"), env=env) as proc:
        wait_for(lambda: ready() or proc.poll() is not None, timeout=60, step=0.001,
                 what="/readyz")
        assert proc.poll() is None, output(proc)
        assert f"sub=tcp://127.0.0.1:{sub} (bind)" in output(proc)
