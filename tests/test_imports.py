"""The package's import graph, read from the installed sources (AST, nothing imported): no cycle
among shardfeed modules at import time, and no module using another module's private names
(``_core``, the compiled module, is private to the package as a whole and may be used)."""

import ast
import os
from typing import Dict, List, Set, Tuple

import pytest

import shardfeed

PACKAGE_DIR = os.path.dirname(shardfeed.__file__)
ALLOWED_PRIVATE_MODULES = {"_core"}


def _modules() -> Dict[str, ast.Module]:
    trees = {}
    for name in sorted(os.listdir(PACKAGE_DIR)):
        if name.endswith(".py"):
            with open(os.path.join(PACKAGE_DIR, name), encoding="utf-8") as f:
                trees[name[:-3]] = ast.parse(f.read(), filename=name)
    return trees


def _target(module: str, node: ast.ImportFrom) -> str:
    """The shardfeed module a relative or absolute ``from X import`` names ("" for the package)."""
    if node.level:
        if node.level != 1:
            raise AssertionError(f"{module}: import from outside the package (level {node.level})")
        return node.module or ""
    return (node.module or "")[len("shardfeed."):] if (node.module or "").startswith("shardfeed.") else \
        ("" if node.module == "shardfeed" else "<external>")


def _imports(module: str, tree: ast.Module, *, import_time: bool) -> List[Tuple[str, str, int]]:
    """(imported module, imported name or "", line) for each import of a shardfeed module; with
    ``import_time``, only the statements that run when the module is imported (not those inside
    functions)."""
    found = []

    def visit(node: ast.AST) -> None:
        if import_time and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.ImportFrom):
            target = _target(module, node)
            if target != "<external>":
                for alias in node.names:
                    if target == "":  # from . import x: the module x
                        found.append((alias.name, "", node.lineno))
                    else:
                        found.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("shardfeed."):
                    found.append((alias.name[len("shardfeed."):], "", node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``graph`` as a list of modules (first == last), or []."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def walk(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return []


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"loader": {"order"}, "order": {"loader"}}) in (["loader", "order", "loader"],)


def test_no_import_cycle_at_import_time():
    trees = _modules()
    assert {"views", "order", "loader", "keras", "tf", "dataset"} <= set(trees)
    graph = {module: {target for target, _, _ in _imports(module, tree, import_time=True)
                      if target in trees and target != module}
             for module, tree in trees.items()}
    graph.pop("__init__", None)  # the package imports its modules; none imports the package back (below)
    assert _cycle(graph) == [], "import cycle among shardfeed modules at import time"
    for module, tree in trees.items():
        if module != "__init__":
            back = [line for target, _, line in _imports(module, tree, import_time=True) if target == ""]
            assert not back, f"{module}.py imports the package itself at import time (line {back[0]})"


def test_layers_point_downwards():
    """The layering of docs/design.md: the permutations and the views under the loader, the
    loader under its front ends."""
    trees = _modules()
    direct = {module: {target for target, _, _ in _imports(module, tree, import_time=True)}
              for module, tree in trees.items()}
    assert "views" not in direct["order"] and "loader" not in direct["order"]
    assert "loader" not in direct["views"] and "tf" not in direct["views"] and "keras" not in direct["views"]
    assert {"keras", "tf"}.isdisjoint(direct["loader"])


def test_no_module_uses_another_modules_private_names():
    trees = _modules()
    offences = []
    for module, tree in trees.items():
        aliases: Dict[str, str] = {}  # local name -> shardfeed module it is bound to
        for target, name, line in _imports(module, tree, import_time=False):
            if name.startswith("_") and not name.startswith("__") and target not in ALLOWED_PRIVATE_MODULES \
                    and target != module:
                offences.append(f"{module}.py:{line} imports {name} from {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _target(module, node) == "":
                for alias in node.names:
                    aliases[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] not in ALLOWED_PRIVATE_MODULES and aliases[node.value.id] != module):
                offences.append(f"{module}.py:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert offences == []


@pytest.mark.parametrize("name", ["Subset", "Sampler", "Permutation"])
def test_the_public_names_stay_exported(name):
    assert name in shardfeed.__all__ and getattr(shardfeed, name).__name__ == name
    assert getattr(shardfeed, name).__module__ == ("shardfeed.views" if name == "Subset" else "shardfeed.order")
