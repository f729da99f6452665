"""The package's shape, held by a test: what may import what, and how large a class may grow.

Read from the source with ``ast``, so type-only imports (under ``TYPE_CHECKING``) count too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "perspective_asgi"

#: Web frameworks and servers: only the adapters (and the apps built on them) import these.
FRAMEWORKS = frozenset({
    "aiohttp", "fastapi", "hypercorn", "starlette", "tornado", "uvicorn", "websockets",
})

#: Core modules that do no I/O: they must not import anyio (nor asyncio or trio).
PURE_CORE = ("wire", "guards", "policy", "views", "limits", "outbox", "costs", "memory")

MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 50


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {
        module_name(path): ast.parse(path.read_text(), str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def imported(name: str, tree: ast.Module, is_package: bool) -> Iterator[str]:
    """Every module ``tree`` imports, absolute, at any depth (functions and TYPE_CHECKING too)."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            yield origin
            for alias in node.names:
                # ``from . import registry`` imports a module, not a name.
                yield f"{origin}.{alias.name}"


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        is_package = (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()
        targets = {
            target for target in imported(name, tree, is_package)
            if target in trees and target != name
        }
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Return one import cycle as a list of modules, or ``None``."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target in on_stack:
                return [*stack[stack.index(target):], target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def top_level_imports(tree: ast.Module, name: str) -> set[str]:
    """The distributions ``tree`` imports from (``perspective_asgi`` for its own modules)."""
    return {target.split(".")[0] for target in imported(name, tree, is_package=False)}


def test_no_import_cycles_type_only_imports_included() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The check above must be able to fail.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_type_only_and_relative_imports_are_read() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import registry\n"
        "from ..adapters import asgi\n"
        "if TYPE_CHECKING:\n"
        "    from .bridge import SessionBridge\n"
    )
    found = set(imported("perspective_asgi._core.guards", ast.parse(source), is_package=False))
    assert {
        "perspective_asgi._core.registry", "perspective_asgi.adapters.asgi",
        "perspective_asgi._core.bridge",
    } <= found


def test_the_core_imports_no_web_framework() -> None:
    for name, tree in modules().items():
        if name.startswith("perspective_asgi._core") or name in {
            "perspective_asgi._config", "perspective_asgi._types", "perspective_asgi._observer",
            "perspective_asgi._codes", "perspective_asgi._exceptions", "perspective_asgi._auth",
        }:
            found = top_level_imports(tree, name) & FRAMEWORKS
            assert not found, f"{name} imports {sorted(found)}"


@pytest.mark.parametrize("module", PURE_CORE)
def test_pure_core_modules_import_no_event_loop(module: str) -> None:
    name = f"perspective_asgi._core.{module}"
    tree = modules()[name]
    found = top_level_imports(tree, name) & {"anyio", "asyncio", "trio", "sniffio"}
    assert not found, f"{name} imports {sorted(found)}"


def test_adapters_import_only_the_core_and_their_own_framework() -> None:
    own = {
        "perspective_asgi.adapters.tornado": {"tornado"},
        "perspective_asgi.adapters.aiohttp": {"aiohttp"},
        "perspective_asgi.adapters.starlette": {"starlette"},
        "perspective_asgi.adapters.asgi": set(),
        "perspective_asgi.adapters._asgi": set(),
        "perspective_asgi.adapters._handshake": set(),
    }
    trees = modules()
    for name, allowed in own.items():
        found = top_level_imports(trees[name], name) & FRAMEWORKS
        assert found <= allowed, f"{name} imports {sorted(found - allowed)}"


def test_no_class_is_over_400_lines() -> None:
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                assert lines <= MAX_CLASS_LINES, f"{name}.{node.name} has {lines} lines"


def test_no_function_of_the_core_is_over_50_lines() -> None:
    for name, tree in modules().items():
        if not name.startswith("perspective_asgi._core"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                assert lines <= MAX_FUNCTION_LINES, f"{name}.{node.name} has {lines} lines"


def test_the_core_package_init_imports_nothing() -> None:
    # Importing any core module runs _core/__init__; importing the bridge from there would
    # make every core module depend on every other.
    tree = modules()["perspective_asgi._core"]
    assert not [
        node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
        and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")
    ]
