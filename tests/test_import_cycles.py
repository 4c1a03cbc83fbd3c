"""No module of istn imports a module that imports it back, not even lazily in a function."""

from __future__ import annotations

import ast
from pathlib import Path

import istn

ROOT = Path(istn.__file__).parent


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module and package of istn."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("istn", *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue  # runs main(); nothing imports it
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The istn modules ``name`` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            subs = {f"{base}.{a.name}" for a in node.names} & set(modules)
            found.update(subs)  # submodules imported by name
            # ``from pkg import submodule`` needs no attribute of pkg's __init__ (which
            # has run before any of its submodules anyway); any other name does
            if len(subs) < len(node.names):
                found.add(base)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycles = []

    def visit(name: str, stack: list[str], done: set[str]) -> None:
        if name in stack:
            cycles.append(" -> ".join(stack[stack.index(name):] + [name]))
            return
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*stack, name], done)
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        visit(name, [], done)
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_check_sees_lazy_and_relative_imports():
    modules = _modules()
    deps = _imports("istn.cli.train", modules["istn.cli.train"], modules)
    assert {"istn.layout", "istn.cli.common", "istn.engine.train",
            "istn.engine.distributed"} <= deps
