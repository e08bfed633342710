"""The README is executed: every fenced block of README.md runs here as it is written.

Each fenced block (and each table a test compares with the code) follows an HTML comment,
`<!-- test: ID (note) -->`, which GitHub does not show. `COVERAGE` maps every ID to how it
is checked; `SKIPPED` holds what cannot run on a CI machine, with the reason.
`test_every_block_is_marked_and_covered` keeps it so: a block without a marker, a marker
that no test runs, or a new skip fails it.

How a block runs: in bash, as a user pastes it, in a scratch folder that stands for the
clone (its `.venv` is a link to the real one), with `.venv/bin` first on the PATH as after
`source .venv/bin/activate`, and no SWARM_AGG__* variables but the block's own. A block
that serves until Ctrl-C (`swarm-aggregator run`, the proxy, nats-server) starts in the
background in a process group of its own; the test waits until it is ready (/readyz, a
port that accepts), runs the blocks that use it, then sends SIGINT to the group, as Ctrl-C
in its terminal would, and expects exit 0. Blocks run in README order within a recipe,
except the NATS section's, whose later recipe creates what its earlier blocks use.

Ports: the blocks run as written, so on the README's ports (5555-5558, 8080, 4222, 9464,
9465). Each recipe first checks that its ports are free on 127.0.0.1 and fails naming the
port otherwise. pytest runs one test at a time and no other test of the suite uses a fixed
port, so only something outside the suite can hold one. (Moving the ports through
SWARM_AGG__* variables would not reach the Python snippet, whose addresses are literal,
and would no longer run the blocks as written.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from processor.apps.processes import accepts

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV = ROOT / ".venv"
HOST = "127.0.0.1"

# The recipes run on the README's own ports, so two suites on one machine (a second
# checkout, a parallel CI job) take turns, one test at a time: a test may first wait up to
# PORTS_WAIT_S for the other suite's, on top of its own time.
PORTS_LOCK = Path(tempfile.gettempdir()) / "swarm-aggregator-readme-ports.lock"
PORTS_WAIT_S = 240
pytestmark = pytest.mark.timeout(150 + PORTS_WAIT_S)


@pytest.fixture(autouse=True)
def readme_ports() -> Iterator[None]:
    """Hold the README's ports (an advisory lock shared by every checkout) for one test."""
    with open(PORTS_LOCK, "a") as lock:
        deadline = time.monotonic() + PORTS_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test suite held the README's ports (lock "
                                f"{PORTS_LOCK}) for over {PORTS_WAIT_S} s")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

# Every marked block or table of README.md, and how this file checks it.
COVERAGE: dict[str, str] = {
    "make": "`make run` runs (from the clone, venv up to date) and prints the lines of "
            "`demo-output`; `make test` is this suite: `make -n test` shows it runs pytest",
    "activate": "runs with a PATH of /usr/bin:/bin only; both commands answer --version",
    "demo-output": "every line, numbers aside, is printed by `make run`, in order",
    "swergio-toml": "saved as swergio.toml, as the text says, for the next block",
    "swergio-run": "served beside the real swergio server on 127.0.0.1:8080; 20 swergio "
                   "model clients, an environment and an evolution component as the RLGym "
                   "example's: each step's action is the argmax of summed softmax, and a "
                   "GET returns the 20 models' contributions; Ctrl-C exits 0",
    "swergio-server": "served on 127.0.0.1:8080 (as its comment says) with the worker of "
                      "swergio-run: 20 swergio model clients, an environment and an "
                      "evolution component as the RLGym example's step through it; Ctrl-C "
                      "exits 0 for both",
    "zmq-run": "served; its start-up line shows the two bound addresses of its comment",
    "zmq-python": "run with the worker of zmq-run; it prints exactly what its comments show",
    "proxy": "served; both of its ports accept",
    "proxy-worker": "served behind the proxy; ready on /readyz",
    "proxy-loadgen": "exits 0 with actions back; the worker counts complete windows",
    "client-toml": "saved as swarm.toml, the name on its first line, beside the peers",
    "client-run": "served with swarm.toml; ready on /readyz",
    "client-environment": "saved as environment.py and started; once it prints `ready`, "
                          "models.py runs; it prints exactly what its comments show, exit 0",
    "client-models": "saved as models.py; run while the environment waits; exits 0",
    "client-evolution": "saved as evolution.py; run after the step; prints exactly what its "
                        "comments show",
    "cartpole": "each line runs as written, from the clone (venv up to date): every run "
                "answers every step, none PARTIAL; the second runs on NATS, the third "
                "steps 16 environments at a time",
    "cartpole-output": "every line, numbers aside, is printed by `make cartpole`, in order",
    "nats-diagram": "a figure: the stream names in it are the config's defaults",
    "nats-rm-stream": "run after the workers stopped: SWARM_LOGITS is gone, SWARM_ACTIONS "
                      "is kept (`swarm-aggregator nats status`)",
    "nats-get": "run with a worker.toml of the recipe's settings: both workers answer",
    "nats-server": "served; port 4222 accepts",
    "nats-worker-0": "served; ready on /readyz at :9464",
    "nats-worker-1": "served beside worker 0; ready on /readyz at :9465",
    "nats-drive": "every step gets its action (drive exits 0); the summed contributions "
                  "add up to the environment steps",
    "rejection-reasons": "its reasons are exactly processor.errors.REASONS",
    "study": "runs; prints the table `study-table` and writes study.png",
    "study-table": "equal to what the `study` block prints",
    "make-dev": "`make -n` of each target runs what its comment says (pytest; python -m "
                "bench; ruff and mypy); running them here would recurse or take minutes",
}
SKIPPED: dict[str, str] = {
    "nats-compose": "needs a Docker engine, which CI machines do not have",
}
MARKER = re.compile(r"^<!-- test: ([a-z0-9-]+)(?: \((.+)\))? -->$")


# -- the README's blocks --------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    id: str
    lang: str   # the fence's language; "table" for a table
    text: str
    line: int   # where it starts in README.md, 1-based


def parse(text: str) -> tuple[dict[str, Block], list[int], list[str]]:
    """The marked blocks by ID, the lines of fences without a marker, repeated IDs."""
    lines = text.splitlines()
    blocks: dict[str, Block] = {}
    unmarked: list[int] = []
    repeated: list[str] = []

    def add(b: Block) -> None:
        if b.id in blocks:
            repeated.append(b.id)
        blocks[b.id] = b

    def marker(i: int) -> str | None:
        m = MARKER.match(lines[i - 1]) if i > 0 else None
        return m.group(1) if m else None

    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            end = i + 1
            while end < len(lines) and not lines[end].lstrip().startswith("```"):
                end += 1
            bid = marker(i)
            if bid is None:
                unmarked.append(i + 1)
            else:
                body = "".join(f"{x}\n" for x in lines[i + 1:end])
                add(Block(bid, lines[i].strip()[3:], body, i + 1))
            i = end + 1
            continue
        if lines[i].startswith("|") and (bid := marker(i)) is not None:
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            add(Block(bid, "table", "".join(f"{x}\n" for x in lines[i:end]), i + 1))
            i = end
            continue
        i += 1
    return blocks, unmarked, repeated


def block(bid: str) -> str:
    """The text of the README's block `bid`, as written."""
    blocks, _, _ = parse(README.read_text())
    assert bid in blocks, f"README.md has no block marked <!-- test: {bid} -->"
    return blocks[bid].text


def printed_by_comments(code: str) -> list[str]:
    """What a snippet says it prints: the comment of each `print(...)  # OUTPUT` line."""
    return [m.group(1).strip() for m in re.finditer(r"^\s*print\(.*\)\s*#\s*(.+)$", code, re.M)]


def line_pattern(line: str) -> re.Pattern[str]:
    """A line of example output as a pattern: numbers may differ, spacing may differ."""
    out = []
    for i, part in enumerate(re.split(r"(\d+(?:\.\d+)?)", line.strip())):
        if i % 2:
            out.append(r"-?[\d.]+")
        else:
            out.append(r"\s+".join(re.escape(w) for w in re.split(r"\s+", part)))
    return re.compile("".join(out))


def assert_shows(example: str, output: str) -> None:
    """Every line of `example` (but `...`) matches a line of `output`, in order."""
    actual = [x.strip() for x in re.split(r"[\r\n]+", output) if x.strip()]
    at = 0
    for line in example.splitlines():
        if not line.strip() or line.strip() == "...":
            continue
        pattern = line_pattern(line)
        while at < len(actual) and not pattern.fullmatch(actual[at]):
            at += 1
        assert at < len(actual), f"the README shows {line.strip()!r}; not printed " \
                                 f"(in this order) by:\n{output[-3000:]}"
        at += 1


def table_rows(table: str) -> list[list[str]]:
    """The cells of a Markdown table's body rows."""
    rows = [[c.strip() for c in x.strip().strip("|").split("|")] for x in table.splitlines()]
    return [r for r in rows[2:] if r]


def section_table(heading: str) -> str:
    """The first table after the README heading `heading`."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    lines = text[start:].splitlines()
    first = next(i for i, x in enumerate(lines) if x.startswith("|"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")),
               len(lines))
    return "\n".join(lines[first:end]) + "\n"


# -- shells ---------------------------------------------------------------------------------


@dataclass
class Served:
    """A block that serves until Ctrl-C, running in a process group of its own."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _exited(self, timeout: float) -> bool:
        """Wait until the group's leader has exited, without reaping it."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if os.waitid(os.P_PID, self.proc.pid,
                             os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return True
            except ChildProcessError:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> int:
        """Ctrl-C, as a terminal sends it: SIGINT to the whole group; SIGKILL after 20 s."""
        if self.proc.returncode is None:
            # Not reaped yet, so the group's id is still this process's: signals reach
            # only what the block started.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            if not self._exited(20):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self._exited(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # what it left behind in its group
        self.proc.wait()
        return self.proc.returncode


class Shell:
    """Blocks pasted into shells, from a scratch folder that stands for the clone."""

    def __init__(self, work: Path) -> None:
        if not (VENV / "bin" / "swarm-aggregator").exists():
            pytest.fail(f"{VENV}/bin/swarm-aggregator is missing: run `make install` first")
        self.work = work
        (work / ".venv").symlink_to(VENV)
        (work / "tmp").mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_AGG__")}
        # As after `source .venv/bin/activate`; TMPDIR keeps nats-server's store (under
        # $TMPDIR/nats/jetstream) apart from other runs.
        env.update(PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
                   VIRTUAL_ENV=str(VENV), TMPDIR=str(work / "tmp"), PYTHONUNBUFFERED="1")
        self.env = env
        self.served: list[Served] = []

    def run(self, text: str, timeout: float = 120, cwd: Path | None = None,
            env: dict[str, str] | None = None, stdin: str | None = None,
            shell: tuple[str, ...] = ("bash", "-eo", "pipefail", "-c")
            ) -> subprocess.CompletedProcess[str]:
        """Run `text` to its end (bash -e: the first command that fails ends it)."""
        proc = subprocess.Popen([*shell, text], cwd=cwd or self.work, env=env or self.env,
                                stdin=subprocess.PIPE if stdin is not None
                                else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            # Not reaped yet: the group is still the one this block started.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"still running after {timeout} s: {text}\n{out[-2000:]}{err[-2000:]}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def ok(self, text: str, **kwargs: object) -> str:
        """Run `text`; it must exit 0. Returns its output."""
        r = self.run(text, **kwargs)  # type: ignore[arg-type]
        assert r.returncode == 0, f"exit {r.returncode}: {text}\n{r.stdout[-3000:]}" \
                                  f"\n{r.stderr[-3000:]}"
        return r.stdout

    @contextlib.contextmanager
    def serve(self, name: str, text: str) -> Iterator[Served]:
        """`text` in the background, stopped (Ctrl-C) when the block ends."""
        log = self.work / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(["bash", "-c", text], cwd=self.work, env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        served = Served(name, proc, log)
        self.served.append(served)
        try:
            yield served
        finally:
            served.stop()

    def wait(self, what: str, ready: Callable[[], bool], timeout: float = 60) -> None:
        """Poll `ready` until true; fail at `timeout`, or at once when a served block ends."""
        end = time.monotonic() + timeout
        while not ready():
            for s in self.served:
                if not s.alive():
                    pytest.fail(f"{s.name} exited {s.proc.returncode} while waiting for "
                                f"{what}:\n{s.output()[-3000:]}")
            if time.monotonic() > end:
                logs = "\n".join(f"--- {s.name}:\n{s.output()[-1500:]}" for s in self.served)
                pytest.fail(f"timed out after {timeout} s waiting for {what}\n{logs}")
            time.sleep(0.05)


@pytest.fixture
def sh(tmp_path: Path) -> Iterator[Shell]:
    shell = Shell(tmp_path)
    try:
        yield shell
    finally:
        for s in shell.served:
            s.stop()


def require_free(*ports: int) -> None:
    """Fail clearly when a port the README's recipe uses is taken on 127.0.0.1."""
    busy = []
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
            try:
                s.bind((HOST, port))
            except OSError:
                busy.append(port)
    if busy:
        pytest.fail(f"port(s) {busy} on {HOST} are in use: the README's recipes run on "
                    "their documented ports; stop what holds them and run again")


def http_status(url: str) -> int:
    try:
        return int(urllib.request.urlopen(url, timeout=2).status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def ready(port: int) -> Callable[[], bool]:
    return lambda: http_status(f"http://{HOST}:{port}/readyz") == 200


# -- the README's structure -----------------------------------------------------------------


def test_every_block_is_marked_and_covered():
    blocks, unmarked, repeated = parse(README.read_text())
    assert not unmarked, f"fenced blocks without a <!-- test: ID --> marker just above, " \
                         f"README.md lines {unmarked}"
    assert not repeated, f"marker IDs used twice: {repeated}"
    assert not set(COVERAGE) & set(SKIPPED)
    assert set(blocks) == set(COVERAGE) | set(SKIPPED), (
        f"in the README, not here: {sorted(set(blocks) - set(COVERAGE) - set(SKIPPED))}; "
        f"here, not in the README: {sorted(set(COVERAGE) | set(SKIPPED) - set(blocks))}")
    source = Path(__file__).read_text()
    untested = [b for b in COVERAGE if f'block("{b}")' not in source]
    assert not untested, f"covered, but no test reads them: {untested}"
    for bid in SKIPPED:
        assert "docker" in blocks[bid].text, "skipped only because they need Docker"


def test_links_and_anchors_resolve():
    """README links to files and headings exist; deploy/ files point at real sections."""
    text = README.read_text()
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith("http"):
            continue
        if target.startswith("#"):
            assert target[1:] in anchors, f"README link to a missing heading: {target}"
        else:
            assert (ROOT / target).exists(), f"README link to a missing file: {target}"
    for f in (ROOT / "deploy").rglob("*"):
        if not f.is_file():
            continue
        content = f.read_text(errors="replace")
        for anchor in re.findall(r"README\.md#([\w-]+)", content):
            assert anchor in anchors, f"{f.relative_to(ROOT)}: README.md#{anchor} is not a heading"
        for path in re.findall(r"\bdocs/[\w./-]*\w", content):
            assert (ROOT / path).exists(), f"{f.relative_to(ROOT)} points at missing {path}"


# Reasons whose row another change adds to the README (the bound on model ids). Once the
# row is there, this test asks for the name to leave this set.
NOT_YET_DOCUMENTED: frozenset[str] = frozenset()


def test_rejection_table_has_every_reason_the_code_has():
    from processor.errors import REASONS

    documented = [r[0].strip("`") for r in table_rows(block("rejection-reasons"))]
    assert not NOT_YET_DOCUMENTED & set(documented), \
        "documented now: remove it from NOT_YET_DOCUMENTED"
    assert sorted(documented) == sorted(set(REASONS) - NOT_YET_DOCUMENTED)


def test_metrics_table_has_every_metric_the_worker_exports():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from processor.messages import COMMANDS
    from processor.metrics import Metrics
    from processor.window import OUTCOMES

    # A registry as the worker's, with one sample in every family, so each shows its labels.
    m = Metrics(CollectorRegistry(), max_models=1)
    m.receive("logits")
    m.credit(["m1", "m2"], [0.5, 0.5], [1, 1], [1, 0])   # m2 goes under model="other"
    m.missed(["m1"])
    m.published(0.001, 0.0005, 1)
    m.aggregation.observe(1e-5)
    m.transport_events.source = lambda: {"reconnect": 1}
    exported: dict[str, tuple[str, set[str]]] = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        if fam.name.endswith("_created"):
            continue  # prometheus_client's creation time of a counter or histogram
        name = fam.name + ("_total" if fam.type == "counter" else "")
        labels = {k for s in fam.samples for k in s.labels if k != "le"}
        exported[name] = (fam.type, labels)

    rows = {r[0].strip("`"): r for r in table_rows(section_table("## Metrics"))}
    ours = {n for n in exported if not n.startswith("process_")}
    assert ours == set(rows) - {"process_*"}, (
        f"exported, not in the table: {sorted(ours - set(rows))}; "
        f"in the table, not exported: {sorted(set(rows) - ours - {'process_*'})}")
    assert "process_*" in rows and any(n.startswith("process_") for n in exported)
    for name in ours:
        kind, labels = exported[name]
        row = rows[name]
        assert row[1] == kind, (name, row[1], kind)
        assert set(re.findall(r"`(\w+)`", row[2])) == labels, (name, row[2], labels)

    def values(cell: str) -> set[str]:
        return {v.strip() for v in cell.split("=", 1)[1].split(",")}

    assert values(rows["swarm_aggregator_evolution_requests_total"][2]) == set(COMMANDS)
    outcomes = rows["swarm_aggregator_windows_closed_total"][3]
    assert {v.strip() for v in outcomes.split(",")} == set(OUTCOMES)


def test_help_names_every_transport(sh):
    from transports import TRANSPORTS

    out = sh.ok("swarm-aggregator --help")
    for kind in TRANSPORTS:
        assert kind in out, kind
    assert "NATS JetStream" in out


def help_of(argv: list[str]) -> str:
    """What `swarm-aggregator ARGV --help` prints, from the command's own parser."""
    import io
    from contextlib import redirect_stdout

    from processor.apps.cli import build_parser

    out = io.StringIO()
    with redirect_stdout(out), contextlib.suppress(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return out.getvalue()


def test_inline_commands_parse_and_keys_writes_its_pair(sh):
    """The commands in the text, `swarm-aggregator ...`: each parses with the command's own
    parser; a synopsis (`[--flag X]`, `{a,b}`) names only options and subcommands that
    exist. The Security section's `keys` line runs and writes the two files it names."""
    import shlex

    from processor.apps.cli import build_parser

    spans = [" ".join(c.split()) for c in re.findall(r"`(swarm-aggregator [^`]+)`",
                                                     README.read_text())]
    nats_help = sh.ok("swarm-aggregator nats --help")
    choices = re.search(r"\{([a-z,]+)\}", nats_help)
    assert choices, nats_help
    for cmd in spans:
        argv = shlex.split(cmd.replace("[", " ").replace("]", " "))[1:]
        if argv[0] == "nats":
            assert set(argv[1].strip("{}").split(",")) <= set(choices.group(1).split(",")), cmd
        elif "[" in cmd:  # a synopsis of the command-line table
            text = help_of(argv[:1])
            for flag in re.findall(r"--[\w-]+", cmd):
                assert flag in text, f"{cmd}: {argv[0]} has no {flag}"
        else:
            try:
                build_parser().parse_args(argv)
            except SystemExit as e:
                pytest.fail(f"the README's `{cmd}` does not parse (exit {e.code})")
    keys = next(c for c in spans if c.startswith("swarm-aggregator keys --dir"))
    sh.ok(keys)
    args = build_parser().parse_args(shlex.split(keys)[1:])
    folder = sh.work / args.dir
    assert {p.name for p in folder.iterdir()} == {f"{args.name}.key", f"{args.name}.key_secret"}


def test_nats_diagram_names_the_default_streams():
    from processor.config import NatsConfig

    figure, n = block("nats-diagram"), NatsConfig()
    assert f"stream {n.stream}" in figure and f"stream {n.action_stream}" in figure


# -- getting started --------------------------------------------------------------------------


@pytest.mark.timeout(120 + PORTS_WAIT_S)
def test_make_run_prints_what_the_readme_shows(sh):
    commands = [x.split("#")[0].strip() for x in block("make").splitlines() if x.strip()]
    assert commands == ["make run", "make test"]
    # `make run` installs when the venv is older than pyproject.toml or the Makefile: that
    # needs the network and minutes, which is `make test`'s job, not this test's.
    stale = sh.run("make -q .venv/.installed", cwd=ROOT)
    if stale.returncode != 0:
        pytest.fail("the virtualenv is older than pyproject.toml or the Makefile: "
                    "run `make install`, then this test")
    run_line = next(x for x in block("make").splitlines() if x.startswith("make run"))
    assert_shows(block("demo-output"), sh.ok(run_line, cwd=ROOT, timeout=100))
    dry = sh.ok("make -n test", cwd=ROOT)
    assert "-m pytest" in dry


def test_activate_puts_the_commands_on_the_path(sh):
    from processor import __version__

    bare = "/usr/bin:/bin"  # nothing of the venv, as in a new terminal
    assert shutil.which("swarm-aggregator", path=bare) is None
    out = sh.ok(block("activate"), env={**sh.env, "PATH": bare})
    assert f"swarm-aggregator {__version__}" in out
    assert re.search(r"nats-server: v2\.\d+", out), out


def test_development_targets_run_what_they_say(sh):
    lines = [x for x in block("make-dev").splitlines() if x.strip()]
    targets = {x.split()[1]: x for x in lines}
    assert [x.split("#")[0].split() for x in lines] == [["make", t] for t in targets]
    expect = {"test": ["-m pytest"], "bench": ["-m bench"], "lint": ["ruff check", "mypy"]}
    assert set(targets) == set(expect)
    for target, tools in expect.items():
        dry = sh.ok(f"make -n {target}", cwd=ROOT)
        for tool in tools:
            assert tool in dry, (target, tool, dry)


# -- the CartPole example -----------------------------------------------------------------------


@pytest.mark.timeout(360 + PORTS_WAIT_S)
def test_cartpole_example_runs_as_written(sh):
    stale = sh.run("make -q .venv/.installed", cwd=ROOT)
    if stale.returncode != 0:
        pytest.fail("the virtualenv is older than pyproject.toml or the Makefile: "
                    "run `make install`, then this test")
    lines = [x.split("#")[0].strip() for x in block("cartpole").splitlines() if x.strip()]
    assert lines[0] == "make cartpole"
    outputs = [sh.ok(line, cwd=ROOT, timeout=240) for line in lines]
    assert_shows(block("cartpole-output"), outputs[0])
    for line, out in zip(lines, outputs):
        m = re.search(r"every step answered: (\d+) of (\d+) actions, 0 partial", out)
        assert m and m.group(1) == m.group(2), f"{line}:\n{out[-3000:]}"
    assert "transport: NATS JetStream" in outputs[1]
    assert "16 CartPole-v1 environments per step" in outputs[2]


# -- recipes ----------------------------------------------------------------------------------


def softmax_sum_argmax(logits: list[list[float]]) -> int:
    x = np.asarray(logits, dtype=np.float64)
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return int(p.sum(axis=0).argmax())


def run_rlgym_swarm(port: int, models: int, steps: int, seed: int
                    ) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, list[float]]],
                               dict[str, Any]]:
    """The RLGym example's peers on a swergio server at `port`: the evolution loop, the
    models (logits drawn with `seed`), the environment; `steps` steps, then a GET.
    Returns the actions by step, the logits sent by step, and the GET's reply."""
    from tests.swergio_peers import start_pipeline

    rng = np.random.default_rng(seed)
    table = {s: rng.normal(0, 2, (models, 6)).round(3).tolist() for s in range(steps)}
    sent: dict[int, dict[str, list[float]]] = {}
    evo, env, peers, _ = start_pipeline(port, models, table, sent)
    try:
        env.run(0, steps, timeout=60)
        reply = evo.get()
    finally:
        for p in peers:
            p.close()
    return env.actions, sent, reply


@pytest.mark.timeout(150 + PORTS_WAIT_S)
def test_swergio_recipe(sh):
    from tests.swergio_peers import swergio_server

    require_free(8080, 9464)
    toml = block("swergio-toml")
    assert toml.startswith("# swergio.toml\n")  # the text says: save this as swergio.toml
    (sh.work / "swergio.toml").write_text(toml)
    models, steps = 20, 3  # the file's window.models, the RLGym example's NR_OF_MODELS
    with swergio_server(8080), sh.serve("worker", block("swergio-run")) as worker:
        sh.wait("the worker on /readyz", ready(9464))
        actions, sent, reply = run_rlgym_swarm(8080, models, steps, seed=11)
        for s in range(steps):
            action = actions[s]
            assert action["ACTION"] == [softmax_sum_argmax(list(sent[s].values()))], action
            assert "PARTIAL" not in action and action["TO_ROOM"] == "action"
        assert set(reply["CONTRIBUTION"]) == {f"model-{i}" for i in range(models)}
        assert sum(reply["CONTRIBUTION"].values()) == pytest.approx(steps, rel=1e-4)
        assert worker.stop() == 0, worker.output()[-3000:]
    assert "swergio: connected to" in worker.output()


@pytest.mark.timeout(150 + PORTS_WAIT_S)
def test_swergio_server_recipe(sh):
    """The two commands in place of the example's 01_server.py and 03_aggregation.py."""
    require_free(8080, 9464)
    (sh.work / "swergio.toml").write_text(block("swergio-toml"))
    models, steps = 20, 10
    with sh.serve("swergio-server", block("swergio-server")) as server:
        sh.wait("swergio-server on :8080", lambda: accepts(8080))
        with sh.serve("worker", block("swergio-run")) as worker:
            sh.wait("the worker on /readyz", ready(9464))
            actions, sent, reply = run_rlgym_swarm(8080, models, steps, seed=12)
            for s in range(steps):
                assert actions[s]["ACTION"] == [softmax_sum_argmax(list(sent[s].values()))]
            assert sum(reply["CONTRIBUTION"].values()) == pytest.approx(steps, rel=1e-4)
            assert worker.stop() == 0, worker.output()[-3000:]
        assert server.stop() == 0, server.output()[-3000:]
    assert "swergio-server: listening on 127.0.0.1:8080 " in server.output()
    assert "swergio-server: stopped;" in server.output()


def test_zmq_recipe(sh):
    require_free(5555, 5556, 9464)
    snippet = block("zmq-python")
    with sh.serve("worker", block("zmq-run")) as worker:
        sh.wait("the worker on /readyz", ready(9464))
        # What the block's comment says.
        assert "sub=tcp://127.0.0.1:5555 (bind) pub=tcp://127.0.0.1:5556 (bind)" in \
            worker.output()
        # As pasted into `python -`, in a second shell.
        out = sh.ok("python -", stdin=snippet, timeout=60)
        assert out.splitlines() == printed_by_comments(snippet)
        assert worker.stop() == 0, worker.output()[-3000:]


def test_zmq_proxy_recipe(sh):
    from tests.procs import metric

    require_free(5557, 5558, 9464)
    with sh.serve("proxy", block("proxy")) as proxy:
        sh.wait("the proxy's ports", lambda: accepts(5557) and accepts(5558))
        with sh.serve("worker", block("proxy-worker")) as worker:
            sh.wait("the worker on /readyz", ready(9464))
            out = sh.ok(block("proxy-loadgen"), timeout=90)
            m = re.search(r"(\d+) steps sent, (\d+) actions back", out)
            assert m and int(m.group(2)) > 0, out
            assert metric(9464, "swarm_aggregator_windows_closed_total",
                          outcome="complete") > 0
            assert worker.stop() == 0, worker.output()[-3000:]
        assert proxy.stop() == 0, proxy.output()[-3000:]


def test_client_library_recipe(sh):
    require_free(5555, 5556, 9464)
    for text in (block("client-toml"), block("client-environment"), block("client-models"),
                 block("client-evolution")):
        name = text.splitlines()[0].removeprefix("# ")  # each block names its file
        assert re.fullmatch(r"\w+\.(py|toml)", name), name
        (sh.work / name).write_text(text)
    with sh.serve("worker", block("client-run")) as worker:
        sh.wait("the worker on /readyz", ready(9464))
        with sh.serve("environment", "python environment.py") as env:
            sh.wait("the environment to be ready", lambda: "ready" in env.output())
            sh.ok("python models.py", timeout=60)
            assert env.proc.wait(60) == 0, env.output()[-3000:]
        assert env.output().splitlines() == printed_by_comments(block("client-environment"))
        out = sh.ok("python evolution.py", timeout=60)
        assert out.splitlines() == printed_by_comments(block("client-evolution"))
        assert worker.stop() == 0, worker.output()[-3000:]


# The `-c worker.toml` of the evolution section: the two-worker recipe's settings, in a file.
WORKER_TOML = """\
[transport]
kind = "nats"
[transport.nats]
workers = 2
[window]
key = ["ENV_ID", "STEP"]
models = 8
"""


def json_tail(out: str) -> dict:
    """The JSON object that a helper prints last."""
    return json.loads(out[out.rindex("\n{") + 1:] if "\n{" in out else out)


@pytest.mark.timeout(150 + PORTS_WAIT_S)
def test_nats_two_workers_recipe(sh):
    require_free(4222, 9464, 9465)
    with sh.serve("nats-server", block("nats-server")) as server:
        sh.wait("nats-server on :4222", lambda: accepts(4222))
        with sh.serve("worker-0", block("nats-worker-0")) as w0, \
                sh.serve("worker-1", block("nats-worker-1")) as w1:
            sh.wait("both workers on /readyz", lambda: ready(9464)() and ready(9465)())
            out = sh.ok(block("nats-drive"), timeout=120)
            m = re.search(r"done: (\d+) steps, (\d+) actions", out)
            assert m and m.group(1) == m.group(2) == str(16 * 20), out
            merged = json_tail(out)
            assert sorted(merged["PARTITIONS"]) == list(range(8)) and \
                len(merged["WORKERS"]) == 2
            assert sum(merged["CONTRIBUTION"].values()) == pytest.approx(16 * 20, rel=1e-4)

            (sh.work / "worker.toml").write_text(WORKER_TOML)
            again = json_tail(sh.ok(block("nats-get")))
            assert sorted(again["PARTITIONS"]) == list(range(8)) and again["STEPS"] == 0

            assert w0.stop() == 0, w0.output()[-3000:]
            assert w1.stop() == 0, w1.output()[-3000:]
        # Changing P: with the workers stopped, the logits stream goes; the others stay.
        assert "deleted: True" in sh.ok(block("nats-rm-stream"))
        streams = json.loads(sh.ok("swarm-aggregator nats status"))["streams"]
        assert streams["SWARM_LOGITS"] is None and streams["SWARM_ACTIONS"] is not None
        server.stop()
    assert "Server is ready" in server.output()


def test_study_table_is_the_seeded_run(sh):
    out = sh.ok(block("study"), timeout=120)
    printed = [x for x in out.splitlines() if x.startswith("|")]
    assert printed == block("study-table").splitlines(), (
        "the README's study table differs from what the study prints now; paste its output:\n"
        + "\n".join(printed))
    assert (sh.work / "study.png").read_bytes()[:4] == b"\x89PNG"
