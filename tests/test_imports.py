"""The package's import graph, read from the installed sources (AST, nothing imported), sub-packages
(``shardfeed.convert``) included: no cycle among shardfeed modules at import time, imports that
point downwards through the layers of docs/design.md, and no module using another module's
private names (``_core``, the compiled module, is private to the package as a whole and may be
used)."""

import ast
import os
from typing import Dict, List, Optional, Set, Tuple

import pytest

import shardfeed

PACKAGE_DIR = os.path.dirname(shardfeed.__file__)
ALLOWED_PRIVATE_MODULES = {"_core"}


def _modules() -> Dict[str, ast.Module]:
    """Every module of the package, sub-packages included, by dotted name under ``shardfeed``
    (``convert._sink``; a sub-package's ``__init__.py`` is the sub-package, ``convert``; the
    package's own is ``__init__``)."""
    trees = {}
    for directory, subdirs, names in os.walk(PACKAGE_DIR):
        subdirs[:] = sorted(d for d in subdirs if os.path.exists(os.path.join(directory, d, "__init__.py")))
        package = os.path.relpath(directory, PACKAGE_DIR).replace(os.sep, ".").strip(".")
        for name in sorted(names):
            if name.endswith(".py"):
                stem = name[:-3]
                dotted = ("__init__" if not package else package) if stem == "__init__" else \
                    (f"{package}.{stem}" if package else stem)
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    trees[dotted] = ast.parse(f.read(), filename=name)
    return trees


def _package_of(module: str, trees: Dict[str, ast.Module]) -> str:
    """The package a module's relative imports start from ("" for shardfeed itself)."""
    if module == "__init__":
        return ""
    if module in trees and any(other.startswith(module + ".") for other in trees):
        return module  # a sub-package's __init__
    return module.rpartition(".")[0]


def _target(module: str, node: ast.ImportFrom, trees: Dict[str, ast.Module]) -> str:
    """The shardfeed module or package a relative or absolute ``from X import`` names ("" for
    shardfeed itself, "<external>" for another library)."""
    if node.level:
        package = _package_of(module, trees).split(".") if _package_of(module, trees) else []
        if node.level - 1 > len(package):
            raise AssertionError(f"{module}: import from outside the package (level {node.level})")
        base = package[:len(package) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))
    name = node.module or ""
    if name == "shardfeed":
        return ""
    return name[len("shardfeed."):] if name.startswith("shardfeed.") else "<external>"


def _is_package(name: str, trees: Dict[str, ast.Module]) -> bool:
    return name == "" or any(other.startswith(name + ".") for other in trees)


def _imports(module: str, tree: ast.Module, *, import_time: bool,
             trees: Optional[Dict[str, ast.Module]] = None) -> List[Tuple[str, str, int]]:
    """(imported module, imported name or "", line) for each import of a shardfeed module; with
    ``import_time``, only the statements that run when the module is imported (not those inside
    functions). ``from <package> import x`` counts as an import of the module ``<package>.x``."""
    trees = trees if trees is not None else _modules()
    found = []

    def visit(node: ast.AST) -> None:
        if import_time and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.ImportFrom):
            target = _target(module, node, trees)
            if target != "<external>":
                for alias in node.names:
                    if _is_package(target, trees):  # from . import x: the module x
                        found.append((f"{target}.{alias.name}" if target else alias.name, "", node.lineno))
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
    assert {"convert", "convert._sink", "convert._files", "verification", "cli"} <= set(trees)
    graph = {module: {target for target, _, _ in _imports(module, tree, import_time=True, trees=trees)
                      if target in trees and target != module}
             for module, tree in trees.items()}
    graph.pop("__init__", None)  # the package imports its modules; none imports the package back (below)
    assert _cycle(graph) == [], "import cycle among shardfeed modules at import time"
    for module, tree in trees.items():
        if module != "__init__":
            back = [line for target, _, line in _imports(module, tree, import_time=True, trees=trees) if target == ""]
            assert not back, f"{module}.py imports the package itself at import time (line {back[0]})"


# The layers of docs/design.md, lowest first. A module imports, when it is imported, only modules of
# its own layer or of the layers below; a convenience method that would import upwards (ds.subset,
# ds.batches, view.to_tf_dataset) imports inside the method. A sub-package is one layer.
LAYERS = [
    ("base", {"errors", "_text", "_process"}),
    ("on-disk format", {"fileio", "format", "manifest", "compression"}),
    ("core I/O", {"_core", "_casting", "lock", "shardfile", "read_options", "batch_reader", "_reference", "_preload"}),
    ("datasets", {"writer", "dataset", "merge", "verification"}),
    ("views and order", {"order", "views"}),
    ("feed", {"kerasfit", "_prefetch", "loader"}),
    ("front ends", {"keras", "tf", "torch", "_torch_slots"}),
    ("tools", {"convert", "_demo"}),
    ("command line", {"cli", "_bench", "__main__"}),
]
RANK = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}


def _layer_of(module: str) -> int:
    return RANK[module.split(".")[0]]


def _upward_imports(trees: Dict[str, ast.Module]) -> List[str]:
    """Import-time imports of a module of a higher layer (the package's __init__ is the facade
    over every layer, and not checked)."""
    offences = []
    for module, tree in trees.items():
        if module == "__init__":
            continue
        for target, _, line in _imports(module, tree, import_time=True, trees=trees):
            if target.split(".")[0] in RANK and _layer_of(target) > _layer_of(module):
                offences.append(f"{module}.py:{line} imports {target} ({LAYERS[_layer_of(target)][0]}) from the "
                                f"{LAYERS[_layer_of(module)][0]} layer")
    return offences


def test_every_module_has_a_layer():
    assert {module.split(".")[0] for module in _modules()} - {"__init__"} <= set(RANK), \
        "a new module: give it a layer here and in docs/design.md"


def test_layers_point_downwards():
    """The layering of docs/design.md: the permutations and the views under the loader, the
    loader under its front ends."""
    trees = _modules()
    direct = {module: {target for target, _, _ in _imports(module, tree, import_time=True, trees=trees)}
              for module, tree in trees.items()}
    assert "views" not in direct["order"] and "loader" not in direct["order"]
    assert "loader" not in direct["views"] and "tf" not in direct["views"] and "keras" not in direct["views"]
    assert {"keras", "tf"}.isdisjoint(direct["loader"])
    assert "format" in direct["manifest"] and "manifest" not in direct["format"]  # names and schema under the manifest
    assert _upward_imports(trees) == []


def test_the_layer_check_finds_an_upward_import():
    trees = _modules()
    trees["format"] = ast.parse("from .cli import main\n")
    trees["convert._sink"] = ast.parse("from ..cli import main\nfrom ..loader import Feed\n"
                                       "def lazy():\n    from ..cli import main\n")  # lazy: allowed
    assert _upward_imports(trees) == ["format.py:1 imports cli (command line) from the on-disk format layer",
                                      "convert._sink.py:1 imports cli (command line) from the tools layer"]


def _private_name_uses(trees: Dict[str, ast.Module]) -> List[str]:
    offences = []
    for module, tree in trees.items():
        aliases: Dict[str, str] = {}  # local name -> shardfeed module it is bound to
        for target, name, line in _imports(module, tree, import_time=False, trees=trees):
            if name.startswith("_") and not name.startswith("__") and target not in ALLOWED_PRIVATE_MODULES \
                    and target != module:
                offences.append(f"{module}.py:{line} imports {name} from {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _target(module, node, trees) != "<external>" \
                    and _is_package(_target(module, node, trees), trees):
                package = _target(module, node, trees)
                for alias in node.names:
                    aliases[alias.asname or alias.name] = f"{package}.{alias.name}" if package else alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] not in ALLOWED_PRIVATE_MODULES and aliases[node.value.id] != module):
                offences.append(f"{module}.py:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return offences


def test_no_module_uses_another_modules_private_names():
    assert _private_name_uses(_modules()) == []


def test_the_private_name_check_covers_the_sub_packages():
    trees = _modules()
    trees["convert._csv"] = ast.parse("from ._sink import _located\nfrom . import _precision\n"
                                      "x = _precision._TINY\nfrom .. import writer\ny = writer._cast\n")
    assert _private_name_uses(trees) == ["convert._csv.py:1 imports _located from convert._sink",
                                         "convert._csv.py:3 uses convert._precision._TINY",
                                         "convert._csv.py:5 uses writer._cast"]


@pytest.mark.parametrize("name", ["Subset", "Sampler", "Permutation"])
def test_the_public_names_stay_exported(name):
    assert name in shardfeed.__all__ and getattr(shardfeed, name).__name__ == name
    assert getattr(shardfeed, name).__module__ == ("shardfeed.views" if name == "Subset" else "shardfeed.order")


CONVERT_NAMES = ["ConversionReport", "FieldReport", "from_arrays", "from_csv", "from_files", "from_hdf5", "from_iterable",
                 "from_npy", "from_npz", "DEFAULT_CHUNK_BYTES", "IMAGE_SUFFIXES", "PathLike", "Progress"]


@pytest.mark.parametrize("name", CONVERT_NAMES)
def test_the_converters_public_names_stay_where_they_were(name):
    """shardfeed.convert became a package: what convert.py offered is still shardfeed.convert.<name>."""
    import importlib

    convert = importlib.import_module("shardfeed.convert")
    assert hasattr(convert, name)
    exported = getattr(convert, name)
    if callable(exported) and hasattr(exported, "__module__") and name[0] != "P":
        assert exported.__module__.startswith("shardfeed.convert.") and exported.__name__ == name
        assert (name in convert.__all__) == (name[0] in "CFf")
