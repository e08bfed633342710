"""The layout holds: the core imports no transport and no application."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.procs import ROOT

CORE = sorted(p.stem for p in (ROOT / "processor").glob("*.py")
              if p.stem not in ("__init__", "__main__"))


def test_the_core_is_these_modules():
    assert CORE == ["aggregate", "config", "errors", "ledger", "messages", "metrics",
                    "window", "worker"]


def test_importing_the_core_loads_no_transport_and_no_application():
    code = ("import sys\n"
            + "".join(f"import processor.{m}\n" for m in CORE)
            + "print('\\n'.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=True, timeout=60).stdout.split()
    assert not [m for m in loaded if m == "transports" or m.startswith("transports.")]
    assert not [m for m in loaded if m.startswith("processor.apps")]
    assert "zmq" not in loaded and "nats" not in loaded  # nor their libraries


def _imports(path: Path) -> list[str]:
    """Modules a file imports at run time (an `if TYPE_CHECKING:` block is for types)."""
    tree = ast.parse(path.read_text())
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                out.extend(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = "." * child.level + (child.module or "")
                out.append(base)
            visit(child)
    visit(tree)
    return out


def test_no_core_module_imports_a_transport_or_an_app_even_lazily():
    for m in CORE:
        for name in _imports(ROOT / "processor" / f"{m}.py"):
            assert not name.startswith(("transports", ".apps", "processor.apps", "zmq",
                                        "nats")), (m, name)


def test_importing_the_worker_leaves_torch_threads_alone():
    # Only a running worker sets one thread (processor.aggregate.use_one_thread).
    code = ("import torch\nn = torch.get_num_threads()\n"
            "import processor.worker, processor.aggregate, processor.apps.cli\n"
            "print(n == torch.get_num_threads() and n > 1)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60,
                         env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == "True"
