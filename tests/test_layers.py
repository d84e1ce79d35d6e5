"""The package's layers: imports only go down, no cycles, no private name crosses a module.

Every module of convbn_fx is parsed (imports inside functions included, since that is how a
cycle hides) and each import is resolved to the convbn_fx module it names. The layers,
lowest first, are the subpackages below; the package root re-exports the public API and is
above them all. A module may import from its own layer or a lower one.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import convbn_fx

PACKAGE = pathlib.Path(convbn_fx.__file__).parent
LAYERS = ["vocabulary", "kernels", "passes", "graph", "model", "frontends", "tools"]
ROOT_RANK = len(LAYERS)  # convbn_fx/__init__.py and __main__.py


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _rank(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else ROOT_RANK


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported convbn_fx module, imported name or None, line) for every import."""
    tree = ast.parse(MODULES[module].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names
                      if a.name.split(".")[0] == "convbn_fx"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] != "convbn_fx":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None, node.lineno) if sub in MODULES
                             else (target, alias.name, node.lineno))
    return found


EDGES = {m: _imports(m) for m in MODULES}


def test_every_module_sits_in_a_layer():
    outside = [m for m in MODULES if _rank(m) == ROOT_RANK
               and m not in ("convbn_fx", "convbn_fx.__main__")]
    assert outside == [], f"modules outside the layer folders: {outside}"


def test_imports_only_go_down_a_layer():
    upward = [f"{m}:{line} imports {target} ({LAYERS[_rank(target)] if _rank(target) < ROOT_RANK else 'the package root'})"
              for m, edges in EDGES.items() for target, _, line in edges
              if _rank(target) > _rank(m)]
    assert upward == []


def test_no_private_name_crosses_a_module():
    private = [f"{m}:{line} imports {name} from {target}"
               for m, edges in EDGES.items() for target, name, line in edges
               if name is not None and name.startswith("_") and target != m]
    private += [f"{m}:{line} imports {target}" for m, edges in EDGES.items()
                for target, _, line in edges
                if any(p.startswith("_") and not p.startswith("__")
                       for p in target.split(".")[1:])]
    assert private == []


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in edges if t in MODULES and t != m} for m, edges in EDGES.items()}
    # A package's __init__ is imported with any of its modules: an edge to a module is also
    # an edge to every package on its path.
    for deps in graph.values():
        for t in list(deps):
            parts = t.split(".")
            deps.update(".".join(parts[:i]) for i in range(2, len(parts))
                        if ".".join(parts[:i]) in MODULES)
    cycles, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(" → ".join(path[path.index(t):] + [t]))
            elif t not in state and not (m.startswith(t + ".") and t in MODULES):
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # A module importing its own package's __init__ is not a cycle of modules.
    cycles = [c for c in cycles if not all(a.startswith(b) or b.startswith(a)
                                           for a, b in zip(c.split(" → "), c.split(" → ")[1:]))]
    assert cycles == []


def test_the_test_sees_imports_inside_functions():
    """Guard against a test that cannot fail: a known function-level import is found."""
    edges = EDGES["convbn_fx.tools.cli"]
    assert any(t == "convbn_fx.tools.plot" for t, _, _ in edges)
    assert _rank("convbn_fx.tools.cli") > _rank("convbn_fx.frontends.tune") > \
        _rank("convbn_fx.model.tuned") > _rank("convbn_fx.graph.find") > \
        _rank("convbn_fx.passes.tune") > _rank("convbn_fx.kernels.conv") > \
        _rank("convbn_fx.vocabulary.blocks")


@pytest.mark.parametrize("path", sorted(MODULES.values()), ids=lambda p: p.name)
def test_no_file_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


def test_import_loads_no_tools_tabulate_or_dynamo():
    code = ("import sys, convbn_fx; "
            "print(sorted(m for m in sys.modules if m.startswith('convbn_fx.tools') "
            "or m in ('tabulate', 'torch._dynamo', 'torch._inductor')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
