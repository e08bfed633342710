"""One real-bench case (bench.nats_bench.bench_nats) with the worker patched by realpatch.

    .venv/bin/python bench/experiments/nats_server_cpu/realrun.py MODE [GOMAXPROCS]
MODE: none | all | allpurge | interest ; prints the Result and the logits stream's state.
"""
import asyncio
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository
from bench import nats_bench as nb

mode = sys.argv[1]
if mode != "none":
    os.environ["NATSEXP_PATCH"] = mode
    os.environ["PYTHONPATH"] = str(Path(__file__).resolve().parent / "patchroot")
if len(sys.argv) > 2:
    os.environ["GOMAXPROCS"] = sys.argv[2]
args = nb.parse_args(["--workers", "1", "--seconds", "3", "--latency-steps", "30"])
with tempfile.TemporaryDirectory() as tmp:
    r = asyncio.run(nb.bench_nats(args, nb.Bodies(8, 18), Path(tmp), 1))
    print(r)
    print(open(next(Path(tmp).rglob("*worker0.log"))).read()[-2000:])
