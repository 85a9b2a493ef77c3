"""The package's structure, as README's Architecture section states it: imports flow one way.

Read from the source with ``ast`` (nothing is imported): every zoo-internal import made at module
level goes to a lower floor of README's floors table (or stays inside its own package), so the
graph has no cycle; and zoo modules import each other only at the top of a file, with two
documented exceptions (the registry's scan of ``zoo.models``, and the CLI's command handlers,
which import the heavy modules only after the arguments are parsed). Every ``RELZOO_*`` variable
is read through ``zoo.paths``.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO_ROOT
from zoo import paths

PACKAGE = REPO_ROOT / "zoo"
# (module, function) pairs allowed to import zoo modules inside a function, and why.
FUNCTION_LEVEL_IMPORTS = {
    ("zoo.registry", "_import_model_modules"),   # the registry's one upward import: it runs @register_model
}
CLI_MODULE = "zoo.cli"                            # handlers import after parsing: `--help` imports no torch


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.AST, module: str, known: set[str]) -> list[str]:
    """The zoo modules an import statement names (``from zoo import x`` names ``zoo.x`` when it is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative import: resolve against the importing package
            base = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix for alias in node.names]
    else:
        return []
    return [n for n in names if n == "zoo" or n.startswith("zoo.")]


def _function_level_imports(tree: ast.Module):
    """(function name, import node) for every import inside a function body."""
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield func.name, node


def _floors() -> dict[str, int]:
    """README's floors table: top-level module or package name -> floor number."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("<!-- floors:begin -->", 1)[1].split("<!-- floors:end -->", 1)[0]
    floors = {}
    for row in table.strip().splitlines()[2:]:
        floor, modules = row.strip("|").split("|")[:2]
        for name in re.findall(r"`([\w.]+)`", modules):
            floors[name] = int(floor)
    return floors


def _unit(module: str) -> str:
    """``zoo.models.detr`` -> ``models``; ``zoo.factory`` -> ``factory``."""
    return module.split(".")[1] if "." in module else module


def test_every_import_goes_down_the_floors_of_readme():
    floors = _floors()
    modules = _modules()
    known = set(modules)
    unplaced = sorted({_unit(name) for name in known if name != "zoo"} - set(floors))
    assert not unplaced, f"modules missing from README's floors table: {unplaced}"
    upward = []
    for name, tree in modules.items():
        if name == "zoo":
            continue
        for node in tree.body:
            for target in _targets(node, name, known):
                if target == "zoo" or _unit(target) == _unit(name):
                    continue
                if floors[_unit(target)] >= floors[_unit(name)]:
                    upward.append(f"{name} (floor {floors[_unit(name)]}) imports {target} "
                                  f"(floor {floors[_unit(target)]})")
    assert not upward, "imports that do not go down README's floors:\n" + "\n".join(upward)


def test_zoo_imports_have_no_cycle():
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in modules.items():
        for node in tree.body:  # module level only; TYPE_CHECKING blocks hold no runtime import
            for target in _targets(node, name, known):
                if target in known and target != name and target != "zoo":
                    graph[name].add(target)

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_zoo_modules_import_each_other_at_the_top():
    known = set(_modules())
    offenders = []
    for name, tree in _modules().items():
        for function, node in _function_level_imports(tree):
            if not _targets(node, name, known) or name == CLI_MODULE or (name, function) in FUNCTION_LEVEL_IMPORTS:
                continue
            offenders.append(f"{name}.{function}: {ast.unparse(node)}")
    assert not offenders, "zoo modules import zoo modules inside functions:\n" + "\n".join(offenders)


def test_relzoo_environment_is_read_only_through_zoo_paths():
    declared = {var.name for var in paths.ENVIRONMENT}
    readers, undeclared = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        undeclared |= set(re.findall(r"\bRELZOO_[A-Z0-9_]+\b", text)) - declared
        if path.name != "paths.py" and re.search(r"environ(\.get)?\(?\[?[\"']RELZOO_", text):
            readers.append(str(path.relative_to(REPO_ROOT)))
    assert not readers, f"RELZOO_* read outside zoo/paths.py: {readers}"
    assert not undeclared, f"RELZOO_* names not declared in zoo.paths.ENVIRONMENT: {sorted(undeclared)}"


def test_environment_accessors_reject_bad_values(monkeypatch):
    import pytest

    from zoo.errors import ConfigError

    monkeypatch.setenv("RELZOO_OFFLINE", "maybe")
    with pytest.raises(ConfigError, match="RELZOO_OFFLINE='maybe'"):
        paths.offline()
    monkeypatch.setenv("RELZOO_OFFLINE", "yes")
    assert paths.offline()
    monkeypatch.setenv("RELZOO_LOCK_TIMEOUT", "-3")
    with pytest.raises(ConfigError, match="positive number of seconds"):
        paths.lock_timeout()
    with pytest.raises(ConfigError, match="not a declared"):
        paths.env("RELZOO_NOT_A_VARIABLE")
