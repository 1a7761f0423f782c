"""Imports run one way: no cycle among prunelab's modules (imports inside
functions count), and every module imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
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
    assert users == ["prunelab.tracking"]


def test_every_module_imports_on_its_own():
    """One fresh interpreter per module: a module that only works after another was imported fails here."""
    from concurrent.futures import ThreadPoolExecutor

    def fails(name: str) -> bool:
        return subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, timeout=300).returncode != 0

    names = sorted(modules())
    with ThreadPoolExecutor(4) as pool:
        bad = [n for n, failed in zip(names, pool.map(fails, names)) if failed]
    assert bad == [], f"these modules fail to import on their own: {bad}"
