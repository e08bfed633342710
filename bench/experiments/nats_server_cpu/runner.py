"""Interleaved rounds of variants; server CPU per step, ratios within each round.

    .venv/bin/python bench/experiments/nats_server_cpu/runner.py --set core --rounds 4 --out FILE

Each round runs every variant of the set once, in a rotated order, the harness baseline
("a") included; ratios are taken against that round's "a" (and "REAL:before" when the set
has it). REAL:* cases run the project's real worker (bench.nats_bench.bench_nats) with the
real client library as driver: REAL:main (this checkout), REAL:before (/tmp/nats_before).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

SETS = {
    "core": {
        "a": {},
        "b_limits_all": {"retention": "limits", "ack": "all"},
        "c_limits_all_mem": {"retention": "limits", "ack": "all", "storage": "memory"},
        "limits_explicit": {"retention": "limits"},
        "limits_noack": {"retention": "limits", "ack": "none"},
        "interest_all": {"retention": "interest", "ack": "all"},
        "wq_memory": {"storage": "memory"},
        "e_action_core": {"action": "core"},
        "f_store_only": {"worker": False},
        "f_core_only": {"logits": "core", "action": "core"},
        "REAL:main": {},
        "REAL:before": {},
    },
    "more": {
        "a": {},
        "d_pull64": {"pull_batch": 64},
        "d_pull2048": {"pull_batch": 2048},
        "e_action_norepublish": {"action": "js-norepublish"},
        "e_action_nodedup": {"action_dedup": False},
        "g_logits_nomsgid": {"logits": "js-nomsgid"},
        "g_logits_nopuback": {"logits": "js-noack"},
        "g_no_transform": {"transform": False},
        "g_no_pinned": {"pinned": False},
        "g_no_hb_no_expect": {"hb": False, "expect_hdr": False},
        "g_gomaxprocs1": {"server_env": {"GOMAXPROCS": "1"}},
        "g_gogc400": {"server_env": {"GOGC": "400"}},
        "g_dupwin_10s": {"dup_window_s": 10},
        "b_limits_all": {"retention": "limits", "ack": "all"},
        "b_limits_all_purge1s": {"retention": "limits", "ack": "all", "purge_s": 1.0},
        "b_purge1s+gmp1": {"retention": "limits", "ack": "all", "purge_s": 1.0,
                           "server_env": {"GOMAXPROCS": "1"}},
        "b_purge1s+gmp1+nopuback": {"retention": "limits", "ack": "all", "purge_s": 1.0,
                                    "server_env": {"GOMAXPROCS": "1"}, "logits": "js-noack"},
    },
    "combo": {
        "a": {},
        "REAL:before": {},
        "REAL:main": {},
        "REAL:main+GOMAXPROCS1": {"server_env": {"GOMAXPROCS": "1"}},
        "b_limits_all": {"retention": "limits", "ack": "all"},
        "interest_all": {"retention": "interest", "ack": "all"},
        "g_gomaxprocs1": {"server_env": {"GOMAXPROCS": "1"}},
        "interest_all+gmp1": {"retention": "interest", "ack": "all",
                              "server_env": {"GOMAXPROCS": "1"}},
        "interest_all+gmp1+gogc400": {"retention": "interest", "ack": "all",
                                      "server_env": {"GOMAXPROCS": "1", "GOGC": "400"}},
        "limits_all_mem+gmp1": {"retention": "limits", "ack": "all", "storage": "memory",
                                "server_env": {"GOMAXPROCS": "1"}},
    },
}


_FIXED = {
    "a": {},
    "b_limits_all": {"retention": "limits", "ack": "all"},
    "b_limits_all_purge1s": {"retention": "limits", "ack": "all", "purge_s": 1.0},
    "interest_all": {"retention": "interest", "ack": "all"},
    "c_limits_all_mem": {"retention": "limits", "ack": "all", "storage": "memory"},
    "limits_noack": {"retention": "limits", "ack": "none"},
    "wq_memory": {"storage": "memory"},
    "d_pull64": {"pull_batch": 64},
    "e_action_core": {"action": "core"},
    "e_action_norepublish": {"action": "js-norepublish"},
    "e_action_nodedup": {"action_dedup": False},
    "g_logits_nomsgid": {"logits": "js-nomsgid"},
    "g_logits_nopuback": {"logits": "js-noack"},
    "g_no_transform": {"transform": False},
    "g_no_pinned": {"pinned": False},
    "g_gomaxprocs1": {"server_env": {"GOMAXPROCS": "1"}},
    "g_gogc400": {"server_env": {"GOGC": "400"}},
    "f_store_only": {"worker": False},
    "f_core_only": {"logits": "core", "action": "core"},
}
SETS["real"] = {
    "a": {},
    "REAL:before": {},
    "REAL:main": {},
    "REAL:main+gmp1": {"server_env": {"GOMAXPROCS": "1"}},
    "REAL:allpurge": {"patch": "allpurge"},
    "REAL:allpurge+gmp1": {"patch": "allpurge", "server_env": {"GOMAXPROCS": "1"}},
    "REAL:interest_all": {"patch": "interest"},
    "REAL:allpurge+memory": {"patch": "allpurge", "storage": "memory"},
    "REAL:before+gmp1": {"server_env": {"GOMAXPROCS": "1"}},
}
SETS["arch"] = {
    "a": {},
    "h_store+corelive": {"logits": "js-corelive", "retention": "limits"},
    "h_store+corelive+gmp1": {"logits": "js-corelive", "retention": "limits",
                              "server_env": {"GOMAXPROCS": "1"}},
    "f_store_only": {"worker": False},
    "f_core_only": {"logits": "core", "action": "core"},
    "b_purge1s+gmp1": {"retention": "limits", "ack": "all", "purge_s": 1.0,
                       "server_env": {"GOMAXPROCS": "1"}},
    "b_purge5s": {"retention": "limits", "ack": "all", "purge_s": 5.0},
    "b_limits_all": {"retention": "limits", "ack": "all"},
}
SETS["fixed"] = {k: {**v, "rate": 1000} for k, v in _FIXED.items()}


def real_case(name: str, v: dict, folder: Path) -> dict:
    from bench import nats_bench as nb
    argv = ["--workers", "1", "--seconds", "3", "--latency-steps", "30"]
    if v.get("storage") == "memory":
        argv += ["--storage", "memory"]
    args = nb.parse_args(argv)
    root = Path("/tmp/nats_before") if name.startswith("REAL:before") else nb.ROOT
    saved = dict(os.environ)
    os.environ.update(v.get("server_env", {}))
    if v.get("patch"):
        os.environ["NATSEXP_PATCH"] = v["patch"]
        os.environ["PYTHONPATH"] = str(Path(__file__).resolve().parent / "patchroot")
    try:
        bodies = nb.Bodies(args.models, args.actions)
        r = asyncio.run(nb.bench_nats(args, bodies, folder, 1, root,
                                      "before" if "before" in name else "nats"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {"server_us_per_step": 1e3 * r.cpu_ms_per_step["server"],
            "worker_us_per_step_total": 1e3 * r.cpu_ms_per_step["worker"],
            "driver_us_per_step": 1e3 * r.cpu_ms_per_step["driver"],
            "steps_per_s": r.steps_per_s, "load": harness.loadavg()}


def run_one(name: str, v: dict, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="natsexp-") as tmp:
        if name.startswith("REAL:"):
            return real_case(name, v, Path(tmp))
        warm = 1000 if v.get("rate") else 1500
        return harness.run_variant({**harness.DEFAULT, **v}, 8, 64, warm, steps, Path(tmp))


def summarize(rows: list[dict], names: list[str]) -> str:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["name"], []).append(r)
    rounds = sorted({r["round"] for r in rows})
    base = {r["round"]: r["server_us_per_step"] for r in rows if r["name"] == "a"}
    before = {r["round"]: r["server_us_per_step"] for r in rows if r["name"] == "REAL:before"}
    lines = ["| variant | server µs/step median [min–max] | n | / a (per round) | "
             "/ bed3487 (per round) | steps/s median | in msgs/step | out msgs/step | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        rs = by.get(n, [])
        if not rs:
            continue
        xs = sorted(r["server_us_per_step"] for r in rs)
        ra = sorted(r["server_us_per_step"] / base[r["round"]] for r in rs if r["round"] in base)
        rb = sorted(r["server_us_per_step"] / before[r["round"]] for r in rs
                    if r["round"] in before)
        sp = statistics.median(r["steps_per_s"] for r in rs)
        im = [r["in_msgs_per_step"] for r in rs if "in_msgs_per_step" in r]
        om = [r["out_msgs_per_step"] for r in rs if "out_msgs_per_step" in r]
        loads = sorted(float(r["load"].split()[0]) for r in rs)

        def f(x: list[float], d: int = 0) -> str:
            if not x:
                return "-"
            return f"{statistics.median(x):.{d}f} [{x[0]:.{d}f}–{x[-1]:.{d}f}]"
        lines.append(f"| {n} | {f(xs)} | {len(xs)} | {f(ra, 2)} | {f(rb, 2)} | {sp:.0f} | "
                     f"{statistics.median(im):.2f} | " if im else
                     f"| {n} | {f(xs)} | {len(xs)} | {f(ra, 2)} | {f(rb, 2)} | {sp:.0f} | - | ")
        lines[-1] += (f"{statistics.median(om):.2f} | " if om else "- | ") + \
            f"{loads[0]:.2f}–{loads[-1]:.2f} |"
    return "\n".join(lines) + f"\n(rounds: {len(rounds)})"


def main() -> None:
    import signal
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(SystemExit(143)))
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="core")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    variants = SETS[a.set]
    names = [n for n in variants if not a.only or n in a.only or n == "a"]
    out = Path(a.out)
    rows = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    start = max([r["round"] for r in rows], default=-1) + 1
    for rnd in range(start, start + a.rounds):
        k = rnd % len(names)
        order = names[k:] + names[:k]
        for n in order:
            t0 = time.time()
            try:
                r = run_one(n, variants[n], a.steps)
            except Exception as e:  # noqa: BLE001
                print(f"round {rnd} {n}: FAILED {e!r}", flush=True)
                continue
            r.update(name=n, round=rnd)
            with out.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"round {rnd} {n:28s} server {r['server_us_per_step']:6.1f} µs/step  "
                  f"{r['steps_per_s']:6.0f} steps/s  load {r['load']}  ({time.time()-t0:.0f}s)",
                  flush=True)
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        print(summarize(rows, names), flush=True)


if __name__ == "__main__":
    main()
