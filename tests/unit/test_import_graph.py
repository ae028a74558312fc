"""The package's import graph (issue 16): no cycle, and the layers import downward.

Only imports made when a module is imported count: those at module level,
not under ``if TYPE_CHECKING:``. An import inside a function is how a module
reaches a layer above it at run time on purpose (``cli`` starting the
worker, ``check`` asking the broker adapter), and is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "celerycompat"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module.split(".")
                    package = package if is_package else package[:-1]
                    package = package[:len(package) - (node.level - 1)]
                    base = ".".join([*package, base] if base else package)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        imported = _top_level_imports(tree, name, path.name == "__init__.py")
        graph[name] = {target for target in imported if target in modules and target != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = walk(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    assert _cycle(import_graph()) is None


#: Modules that must not import (at module level) anything of the layers listed.
LOWER_LAYERS = {
    "celerycompat.protocol": ("celerycompat.consumer", "celerycompat.pools",
                              "celerycompat.execution", "celerycompat.backends",
                              "celerycompat.worker", "celerycompat.cli", "celerycompat.boot"),
    "celerycompat.backends": ("celerycompat.consumer", "celerycompat.pools",
                              "celerycompat.execution", "celerycompat.worker",
                              "celerycompat.cli", "celerycompat.boot"),
    "celerycompat.execution": ("celerycompat.consumer", "celerycompat.pools",
                               "celerycompat.worker", "celerycompat.cli", "celerycompat.boot"),
    "celerycompat.pools": ("celerycompat.consumer", "celerycompat.worker",
                           "celerycompat.cli", "celerycompat.boot"),
    "celerycompat.consumer": ("celerycompat.worker", "celerycompat.cli", "celerycompat.boot"),
    "celerycompat.boot": ("celerycompat.cli", "celerycompat.worker"),
}


@pytest.mark.parametrize("layer", sorted(LOWER_LAYERS))
def test_a_layer_imports_only_downward(layer):
    graph = import_graph()
    upward = sorted(
        (module, target) for module, targets in graph.items()
        if module == layer or module.startswith(layer + ".")
        for target in targets
        if any(target == above or target.startswith(above + ".")
               for above in LOWER_LAYERS[layer]))
    assert upward == []


def test_a_cycle_and_an_upward_import_are_found():
    """The checks themselves: a synthetic graph with a cycle; a relative
    import resolved, one under ``TYPE_CHECKING`` left out."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("from ..worker import Worker\n"
                     "if TYPE_CHECKING:\n    import celerycompat.cli\n")
    assert _top_level_imports(tree, "celerycompat.pools.x", False) == {
        "celerycompat.worker", "celerycompat.worker.Worker"}


def _all_imported_top_levels() -> set[str]:
    """Every top-level module name the package imports anywhere (functions included)."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return names


def _requirement_name(text: str) -> str:
    import re

    return re.split(r"[\s\[<>=!~;]", text.strip(), maxsplit=1)[0].lower().replace("_", "-")


#: Imported only where a feature asks for it, with Celery's error when absent.
OPTIONAL_IMPORTS = {
    "objgraph": "the objgraph control command: 'Requires the objgraph library', as Celery's",
}


def test_every_package_the_code_imports_is_declared():
    """What ``pip install celerycompat`` brings (dependencies, or the extra
    of the pool that needs it) covers every third-party import (issue 16)."""
    import sys
    from importlib.metadata import packages_distributions

    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    declared |= {_requirement_name(r) for name in ("gevent", "eventlet") for r in extras[name]}
    distributions = packages_distributions()
    undeclared = {}
    ours = {"celerycompat", "__future__", *OPTIONAL_IMPORTS}
    for name in sorted(_all_imported_top_levels() - ours):
        if name in sys.stdlib_module_names:
            continue
        owners = {d.lower().replace("_", "-") for d in distributions.get(name, [])}
        if not owners & declared:
            undeclared[name] = sorted(owners)
    assert undeclared == {}


def test_a_worker_without_metrics_does_not_load_the_metrics_stack():
    """prometheus_client and an HTTP server cost every worker process a few
    MiB of RSS (prefork children included): only ``--metrics-port`` loads them."""
    import subprocess
    import sys

    code = ("import sys, celerycompat.cli, celerycompat.worker, celerycompat.boot; "
            "print(sorted(m for m in ('prometheus_client', 'http.server', "
            "'celerycompat.observability.service') if m in sys.modules))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, timeout=60).stdout.strip()
    assert shown == "[]"
