"""The import graph of our packages: no cycles, and the layer rule from STYLE.md.

Built with `ast` from the source, so every import counts: module-level, function-level (lazy)
and `if TYPE_CHECKING:` ones alike, since each is an arrow a reader has to follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "engine", "attention", "scheduler", "transport")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _our_modules() -> dict[str, Path]:
    return {
        _module_name(path): path for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))
    }


def _resolve_relative(module: str, path: Path, node: ast.ImportFrom) -> str:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")
    if node.level > 1:
        base = base[: -(node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST, type_only: bool = False):
    """(node, whether it sits under `if TYPE_CHECKING:`) for every import, at any depth."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, type_only
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]), True)
            for stmt in child.orelse:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]), type_only)
        else:
            yield from _import_nodes(child, type_only)


def _imports_of(module: str, path: Path, modules: dict[str, Path]) -> dict[str, bool]:
    """Our modules that `module` imports, each with whether every import of it is type-only;
    `from x import y` is x.y when that is a module."""
    targets: dict[str, bool] = {}
    tree = ast.parse(path.read_text(), filename=str(path))
    for node, type_only in _import_nodes(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            source = _resolve_relative(module, path, node) if node.level else node.module or ""
            names = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                for alias in node.names
            ]
        for name in names:
            # `import a.b.c` names a.b.c; fall back to the longest prefix that is ours.
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets[name] = targets.get(name, True) and type_only
    return targets


def _arrows() -> dict[str, dict[str, bool]]:
    modules = _our_modules()
    return {module: _imports_of(module, path, modules) for module, path in modules.items()}


def _graph(exempt=lambda source, target, type_only: False) -> dict[str, set[str]]:
    return {
        module: {t for t, type_only in targets.items() if not exempt(module, t, type_only)}
        for module, targets in _arrows().items()
    }


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None; iterative DFS with white/grey/black marks."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph[child])))
    return None


def _package(module: str) -> str:
    return module.split(".")[0]


def _allowed(target: str, rules: set[str]) -> bool:
    return any(target == rule or target.startswith(rule + ".") for rule in rules)


# What each package may import of ours, besides itself. Arrows point one way:
# server -> scheduler, transport, engine -> attention (STYLE.md, "The layout is the architecture").
ALLOWED = {
    "server": {"engine", "attention", "scheduler", "transport"},
    # The runner drives the attention backends and hands offloaded attention to an executor over
    # transport; the engine never reaches up into the server.
    "engine": {"attention", "transport"},
    # The backends (the kernels behind one interface) need nothing of the engine; see
    # EXECUTOR_ROLE for the one exception.
    "attention": {"transport"},
    # Decisions only, over plain data: the scheduler imports nothing of ours. (Its plain data
    # types are its own dataclasses; transport.messages is not needed, and so not allowed.)
    "scheduler": set(),
    # How bytes and messages move; it knows nothing of who sends them.
    "transport": set(),
}

# The attention executor is a role, not a kernel: it keeps offloaded requests' KV in a pool of
# blocks with the engine's own block manager, Sequence and step-time average, rather than a
# second copy of them. Only its two modules may, and only those engine modules, none of which
# imports attention (test_no_import_cycles holds that).
EXECUTOR_ROLE = {
    "attention.executor": {"engine.kv_cache", "engine.sequence", "engine.step_timing"},
    "attention.executor_worker": {"engine.kv_cache"},
}


def _simulator_back_reference(source: str, target: str, type_only: bool) -> bool:
    """Not yet mended: the simulator's components (server/simulate/{executor,router,workers}.py)
    name, for their type hints only, the `Simulation` that owns them and their siblings
    (`if TYPE_CHECKING:`). Every run-time arrow there points one way; the type-only ones that
    point back are left out of the cycle check, and nowhere else."""
    inside = "server.simulate."
    return type_only and source.startswith(inside) and target.startswith(inside)


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if _package(target) != _package(module)
        and not _allowed(target, ALLOWED[_package(module)] | EXECUTOR_ROLE.get(module, set()))
    )


def test_every_package_module_is_in_the_graph() -> None:
    graph = _graph()
    for pkg in PACKAGES:
        assert pkg in graph, f"{pkg}/__init__.py missing"
    # The resolver must see real arrows, or the assertions below would pass on an empty graph:
    # a module-level one, a function-level one and a TYPE_CHECKING one.
    arrows = _arrows()
    assert arrows["engine.engine"]["engine.config"] is False
    assert "scheduler.cost_model" in graph["scheduler.policies"]
    assert arrows["engine.sequence"]["engine.grammar_state"] is True
    assert "transport.shm_transfer" in graph["transport.kv_transfer"]  # lazy, in the factory


def test_no_import_cycles() -> None:
    cycle = _find_cycle(_graph(exempt=_simulator_back_reference))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_layer_rule() -> None:
    violations = _layer_violations(_graph())
    assert not violations, "imports against the layer rule:\n" + "\n".join(violations)


def test_cycle_finder_reports_a_path() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
