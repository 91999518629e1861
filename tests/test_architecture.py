"""The package layout keeps its promises: no import circle, dependencies point one way.

Both rules come from /work/shared/design/ARCHITECTURE.md ("Dependencies point one way:
launch -> pretrain / finetune -> runtime / data -> models -> ops. Tasks never import each
other's internals ... Nothing in ops/ or models/ imports deepspeed, webdataset or submitit;
nothing outside launch/ imports submitit") and issue #13 ("Break the import circles ...
no import circle"). The import graph is read from the source with ``ast`` (nothing is
imported), so the test is fast and sees imports inside functions too: a lazy import still
ties two modules together. Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ops", "models", "data", "runtime", "pretrain", "finetune", "launch")

# ARCHITECTURE.md's direction, as layers: a package may import a lower layer only.
# runtime/ and data/ are one layer ("pretrain / finetune -> runtime / data -> models").
LAYER = {"ops": 0, "models": 1, "runtime": 2, "data": 2, "pretrain": 3,
         "finetune": 3, "launch": 4}
SAME_LAYER_OK = {("runtime", "data"), ("data", "runtime")}
# ARCHITECTURE.md: third-party frameworks each package must not import.
FORBIDDEN_THIRD_PARTY = {
    "ops": {"deepspeed", "webdataset", "submitit"},
    "models": {"deepspeed", "webdataset", "submitit"},
    **{p: {"submitit"} for p in ("data", "runtime", "pretrain", "finetune")},
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.Module, package: str) -> set[str]:
    """Every dotted name the module imports (``from a import b`` gives ``a.b``), at any depth."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import sub`` ties us to pkg.sub, not to pkg's __init__ (a parent
            # package is initialised by every import below it; counting that would make
            # each re-exporting __init__ a circle); ``from mod import func`` falls back to mod.
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(project module -> project modules it imports, module -> top-level names it imports)."""
    modules = _modules()
    edges: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = _imported_names(ast.parse(path.read_text(), str(path)), package)
        targets = set()
        for dotted in imported:
            target = dotted
            while target and target not in modules:  # ``from a import func`` -> module a
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        edges[name] = targets
        external[name] = {d.split(".")[0] for d in imported}
    return edges, external


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(edges):
        if root in state:
            continue
        path = [root]
        stack = [iter(sorted(edges[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges[nxt])))
    return None


def test_the_graph_reader_sees_lazy_relative_and_type_checking_imports():
    """The reader itself: without this, an empty graph would pass every rule below."""
    tree = ast.parse("from typing import TYPE_CHECKING\nfrom . import sib\n"
                     "if TYPE_CHECKING:\n    from launch import cli\n"
                     "def f():\n    import runtime.dist\n    from ..x import y\n")
    names = _imported_names(tree, "finetune.heads")
    assert {"finetune.heads.sib", "runtime.dist", "finetune.x.y"} <= names
    assert "launch.cli" not in names
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    edges, _ = _graph()
    assert "ops.dcnv3.function" in edges and "launch.cli" in edges
    assert "ops.dcnv3.reference" in edges["ops.dcnv3.function"]


def test_no_import_circle_among_the_project_modules():
    edges, _ = _graph()
    cycle = _find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_dependencies_point_one_way_and_frameworks_stay_in_their_layer():
    edges, external = _graph()
    wrong = []
    for module, targets in edges.items():
        src = module.split(".")[0]
        for target in targets:
            dst = target.split(".")[0]
            if dst == src:
                continue
            if LAYER[dst] > LAYER[src] or (LAYER[dst] == LAYER[src]
                                           and (src, dst) not in SAME_LAYER_OK):
                wrong.append(f"{module} imports {target} ({src} may not import {dst})")
    for module, names in external.items():
        for name in names & FORBIDDEN_THIRD_PARTY.get(module.split(".")[0], set()):
            wrong.append(f"{module} imports {name}")
    assert not wrong, "ARCHITECTURE.md's dependency rules broken:\n" + "\n".join(sorted(wrong))



def test_no_module_imports_another_modules_private_names():
    """Issue #13: "stop reaching into private names across packages". A leading underscore
    is Python's convention for "internal to this module" (PEP 8, "Descriptive: Naming
    Styles"); a name another module needs is public API and carries a docstring."""
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] not in PACKAGES or base == name:
                continue
            wrong += [f"{name} imports {base}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    assert not wrong, "\n".join(sorted(wrong))
