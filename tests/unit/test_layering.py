"""The pack's layers, read from the source (module-level imports, no import executed): memora/ (the method) imports
nothing of nodes/, memora_batch/ or memora_build/; nodes/ and memora_batch/ never import the build-only package; no
package has an import cycle; the method package is imported by one name everywhere (no relative ``..memora``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("memora", "memora_batch", "nodes", "memora_build")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of the pack that ``name`` imports at module level (submodules named in ``from x import y`` count as
    themselves, not as their package)."""
    out: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base_parts = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join(base_parts + ([node.module] if node.module else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
            targets = subs or [base]
        else:
            continue
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def test_the_method_package_imports_no_layer_above_it():
    bad = [(m, t) for m, ts in _graph().items() if m.split(".")[0] == "memora"
           for t in ts if t.split(".")[0] in ("nodes", "memora_batch", "memora_build")]
    assert bad == []


def test_runtime_packages_never_import_build_only_code():
    bad = [(m, t) for m, ts in _graph().items() if m.split(".")[0] in ("memora", "nodes", "memora_batch")
           for t in ts if t.split(".")[0] == "memora_build"]
    assert bad == []


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert cycles == []


def test_the_method_package_is_imported_by_one_name():
    relative = [str(p.relative_to(ROOT)) for p in (ROOT / "nodes").glob("*.py")
                if "from ..memora" in p.read_text() or "from .. import memora" in p.read_text()]
    assert relative == []
