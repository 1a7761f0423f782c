"""Imports run one way: no cycle among prunelab's modules (imports inside
functions count), and every module imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import prunelab

ROOT = Path(prunelab.__file__).resolve().parent


def modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The prunelab modules `name` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for c in candidates:
            while c and c not in known:
                c = c.rpartition(".")[0]
            if c and c != name and not name.startswith(c + "."):
                found.add(c)
    return found


def test_no_import_cycle():
    known = modules()
    graph = {m: imports_of(m, f, known) for m, f in known.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(m for m in graph if m in reach(m))
    assert cycles == [], f"modules on an import cycle: {cycles}"


def test_only_tracking_imports_mlflow():
    users = sorted(m for m, f in modules().items()
                   if any(isinstance(n, (ast.Import, ast.ImportFrom)) and
                          any((a.name if isinstance(n, ast.Import) else (n.module or "")).split(".")[0] == "mlflow"
                              for a in (n.names if isinstance(n, ast.Import) else [n]))
                          for n in ast.walk(ast.parse(f.read_text()))))
    assert users and all(m.startswith("prunelab.tracking.") for m in users), users


def test_the_package_re_exports_only_the_api():
    """`prunelab/__init__.py` imports nothing but the API (`api.py`, on first use of its names), which
    sits in the top layer: `import prunelab` stays cheap, and nothing below reaches the API through it."""
    assert imports_of("prunelab", ROOT / "__init__.py", modules()) == {"prunelab.api"}
    assert layer_of("prunelab.api", layers()) == 0


ARCHITECTURE = ROOT.parents[1] / "docs" / "architecture.md"


def layers() -> list[list[str]]:
    """The table of docs/architecture.md's "The layers", top to bottom: each row's
    modules as written there (`cli.py`, `tracking/`)."""
    text = ARCHITECTURE.read_text().split("## The layers", 1)[1]
    table = text[text.index("| layer |"):].split("\n\n", 1)[0]  # the first table of the section
    rows = [line for line in table.splitlines()[2:]]
    return [re.findall(r"`([\w/.]+)`", row.split("|")[2]) for row in rows]


def layer_of(module: str, table: list[list[str]]) -> int:
    path = module.removeprefix("prunelab").lstrip(".").replace(".", "/")
    found = [i for i, names in enumerate(table) for name in names
             if (name.endswith("/") and (path + "/").startswith(name)) or name == f"{path}.py"
             or (name.endswith("/") and path == name.rstrip("/"))]
    return found[0] if len(found) == 1 else -len(found) - 1


def test_imports_follow_the_documented_layers():
    """Every module is in one layer of docs/architecture.md, and imports only its own layer or those below."""
    table = layers()
    known = {m: f for m, f in modules().items() if m != "prunelab"}
    unplaced = sorted(m for m in known if layer_of(m, table) < 0)
    assert unplaced == [], f"modules in no layer (or several) of {ARCHITECTURE.name}: {unplaced}"
    upward = sorted(f"{m} -> {dep}" for m, f in known.items() for dep in imports_of(m, f, modules())
                    if dep != "prunelab" and layer_of(dep, table) < layer_of(m, table))
    assert upward == [], f"imports against the layers of {ARCHITECTURE.name}: {upward}"


# Imports every prunelab module named on the command line, each in a child forked from an
# interpreter that holds only the third-party libraries: a prunelab module that works only
# after another prunelab module was imported fails in its child, as in a fresh interpreter,
# without paying the ~3 s of importing torch and mlflow once per module.
ONE_EACH = """
import importlib, os, sys
import matplotlib, mlflow, numpy, pandas, torch, torch_pruning, torchvision  # noqa: F401
assert not any(m == "prunelab" or m.startswith("prunelab.") for m in sys.modules)
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            print(name, type(exc).__name__, exc, flush=True)
            os._exit(1)
        os._exit(0)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        print("FAILED", name, flush=True)
"""


def test_every_module_imports_on_its_own():
    """Each module imported with no other prunelab module loaded before it: a module that only
    works after another was imported fails here."""
    names = sorted(modules())
    proc = subprocess.run([sys.executable, "-c", ONE_EACH, *names], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bad = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    assert bad == [], f"these modules fail to import on their own: {bad}\n{proc.stdout[-2000:]}"
