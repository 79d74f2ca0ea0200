"""The package's shape, checked in CI: no import cycles, the resilience engine's layers, its size, mypy --strict.

The import graph is read with ``ast`` from ``src/`` (every ``import`` statement, also inside functions; those under
``if TYPE_CHECKING:`` are annotations, not imports, and are left out), so the checks need no import of the code.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "flashcard_pipeline"
RESILIENCE = f"{PACKAGE}.resilience"
#: What the engine may use from the rest of the package: the shared kernel every layer uses.
KERNEL = {f"{PACKAGE}.errors", f"{PACKAGE}.headers"}
#: The engine's policy subpackages: each builds on the core and never on another.
POLICIES = ("retry", "breaker", "ratelimit")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except what sits under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in (child, *_runtime_nodes(child)))
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(name: str) -> set[str]:
    """The package's modules that module ``name`` imports."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in MODULES and target != name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(GRAPH[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_graph_is_read() -> None:
    """The checks below would pass vacuously on an empty graph."""
    assert RESILIENCE in GRAPH[f"{PACKAGE}.runner"] and f"{RESILIENCE}.engine" in GRAPH[RESILIENCE]
    assert f"{RESILIENCE}.core.context" in GRAPH[f"{RESILIENCE}.ratelimit.group"]
    assert f"{PACKAGE}.errors" in GRAPH[f"{RESILIENCE}.retry.config"]


def test_no_import_cycles_anywhere_in_the_package() -> None:
    assert _cycles() == []


def test_the_cycle_check_finds_a_cycle() -> None:
    GRAPH[f"{PACKAGE}.errors"].add(f"{PACKAGE}.headers")
    GRAPH[f"{PACKAGE}.headers"].add(f"{PACKAGE}.errors")
    try:
        assert _cycles() == [[f"{PACKAGE}.errors", f"{PACKAGE}.headers"]]
    finally:
        GRAPH[f"{PACKAGE}.errors"].discard(f"{PACKAGE}.headers")
        GRAPH[f"{PACKAGE}.headers"].discard(f"{PACKAGE}.errors")


def _violations(allowed: dict[str, set[str]]) -> list[str]:
    """``module -> import`` for every import of a module in a key package outside its allowed packages."""
    bad = []
    for name, targets in sorted(GRAPH.items()):
        for package, allowed_packages in allowed.items():
            if _within(name, package):
                bad += [f"{name} -> {t}" for t in sorted(targets) if not any(_within(t, a) for a in allowed_packages)]
    return bad


def test_the_engine_imports_nothing_but_itself_and_the_kernel() -> None:
    """No llm/, storage/, cli/ or config: the engine is given plain configuration and knows no provider."""
    assert _violations({RESILIENCE: {RESILIENCE, *KERNEL}}) == []


def test_the_engine_s_layers() -> None:
    """core <- retry | breaker | ratelimit <- engine: a policy builds on the core, never on another policy."""
    core = f"{RESILIENCE}.core"
    allowed = {core: {core, *KERNEL}, f"{RESILIENCE}.testing": {core}}
    for policy in POLICIES:
        allowed[f"{RESILIENCE}.{policy}"] = {core, f"{RESILIENCE}.{policy}", *KERNEL}
    assert _violations(allowed) == []


def _forbidden(package: str, forbidden: set[str]) -> list[str]:
    return [f"{name} -> {target}" for name, targets in sorted(GRAPH.items()) if _within(name, package)
            for target in sorted(targets) if any(_within(target, f) for f in forbidden)]


def test_the_lower_layers_never_import_upward() -> None:
    """cli/ is imported by nothing but itself and ``python -m``; the LLM client knows no engine, storage no run."""
    top = {f"{PACKAGE}.{name}" for name in ("cli", "runner", "pipeline", "observers")}
    outside_cli = [f"{n} -> {t}" for n, targets in sorted(GRAPH.items()) for t in sorted(targets)
                   if _within(t, f"{PACKAGE}.cli") and not _within(n, f"{PACKAGE}.cli") and n != f"{PACKAGE}.__main__"]
    assert outside_cli == []
    assert _forbidden(f"{PACKAGE}.llm", {*top, RESILIENCE, f"{PACKAGE}.storage"}) == []
    assert _forbidden(f"{PACKAGE}.storage", top) == []


def test_no_engine_module_is_over_about_400_lines() -> None:
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()
             if _within(name, RESILIENCE)}
    assert {name: lines for name, lines in sizes.items() if lines > 400} == {}


@pytest.mark.slow
def test_mypy_strict_passes_on_the_engine() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(SRC / PACKAGE /
                                                                                             "resilience")],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
