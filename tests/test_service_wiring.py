"""The worker's wiring, read from the source: imports among the service modules go one way, and the service
reaches the engine only through the Step API (``pagedserve.service.engine_api.EngineAPI``), which the real
engine provides. Every import counts, ``TYPE_CHECKING`` and function-level ones included."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pagedserve.service as service_pkg
from pagedserve.service.engine_api import EngineAPI

SERVICE = Path(service_pkg.__file__).parent


def _trees() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(SERVICE.glob("*.py"))}


def _service_imports(tree: ast.Module, modules: set[str]) -> set[str]:
    deps: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pagedserve.service."):
            deps.add(node.module.split(".")[2])
    return deps & modules


def test_service_imports_go_one_way():
    trees = _trees()
    graph = {m: _service_imports(t, set(trees)) - {m} for m, t in trees.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m not in done:
            for d in sorted(graph[m]):
                visit(d, path + [m])
            done.add(m)

    for m in sorted(graph):
        visit(m, [])


def _step_api() -> set[str]:
    names = set(EngineAPI.__annotations__)
    names.update(n for n, _ in inspect.getmembers(EngineAPI) if not n.startswith("_"))
    return names


def test_the_service_uses_only_the_step_api():
    api = _step_api()
    used: dict[str, set[str]] = {}
    for module, tree in _trees().items():
        for node in ast.walk(tree):
            # engine.x, engine().x, self.engine.x, self.engine().x
            base = node.value.func if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Call) else None
            base = base if base is not None else (node.value if isinstance(node, ast.Attribute) else None)
            self_attr = isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id == "self"
            name = base.id if isinstance(base, ast.Name) else base.attr if self_attr else None
            if name == "engine":
                used.setdefault(node.attr, set()).add(module)
        for node in tree.body:  # the engine is loaded on first use: never at import (no torch on a producer)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pagedserve.engine"):
                raise AssertionError(f"{module}.py imports {node.module} at module level")
    assert used, "the scan found no engine use at all"
    beyond = {attr: sorted(mods) for attr, mods in used.items() if attr not in api}
    assert not beyond, f"the service reaches past the Step API: {beyond}"


def test_the_engine_provides_the_step_api(shared_engine):
    missing = sorted(n for n in _step_api() if not hasattr(shared_engine, n))
    assert not missing, f"LLMEngine lacks {missing}"
