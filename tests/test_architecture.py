"""The package's layers, read from its import statements (every import, module-level or lazy).

``core`` is the engine and knows no method, pass, report or pipeline helper;
``passes`` rewrite graphs and know only ``core``; ``methods`` are built from
``passes`` and ``core``; everything user-facing sits above them. A module may
import its own layer or a lower one, never a higher one, and no two modules
import each other, directly or around a cycle.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tgate_fx"

# Lowest first. A module belongs to the first layer whose prefix it has.
LAYERS = [
    ("meta", ("tgate_fx._version", "tgate_fx.core.meta")),
    ("core", ("tgate_fx.core",)),
    ("passes", ("tgate_fx.passes",)),
    ("methods", ("tgate_fx.methods",)),
    ("builders", ("tgate_fx.tiny", "tgate_fx.tiny_extra", "tgate_fx.shapes")),
    ("api", ("tgate_fx.api",)),
    ("tools", ("tgate_fx.accounting", "tgate_fx.archs", "tgate_fx.export", "tgate_fx.serve")),
    ("package", ("tgate_fx",)),  # the public names (__init__); the CLI is written against them
    ("cli", ("tgate_fx.cli", "tgate_fx.__main__")),
]


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str) -> set[str]:
    """The package modules ``path`` imports anywhere in it (functions included)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("tgate_fx"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("tgate_fx"):
                continue
            # `from pkg import mod` imports a module when pkg.mod is one
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if _exists(sub) else target)
    out.discard(name)
    return out


def _exists(module: str) -> bool:
    rel = pathlib.Path(*module.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").exists() or (PACKAGE.parent / rel / "__init__.py").exists()


def _layer(module: str) -> int:
    for i, (_, prefixes) in sorted(enumerate(LAYERS), key=lambda x: -max(len(p) for p in x[1][1])):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        graph[name] = _imports(path, name)
    return graph


GRAPH = _graph()


def _is_parent_package(importer: str, imported: str) -> bool:
    # importing a submodule runs its package's __init__, which is fine when the package only re-exports;
    # not the root package, whose __init__ imports every layer
    return imported != "tgate_fx" and importer.startswith(imported + ".")


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_a_module_imports_only_its_own_layer_or_lower(module):
    mine = _layer(module)
    upward = sorted(m for m in GRAPH[module]
                    if _layer(m) > mine and not _is_parent_package(module, m))
    assert not upward, f"{module} ({LAYERS[mine][0]}) imports a higher layer: " + ", ".join(
        f"{m} ({LAYERS[_layer(m)][0]})" for m in upward)


def test_the_meta_keys_module_imports_nothing_of_the_package():
    assert GRAPH["tgate_fx.core.meta"] == set()


def test_no_import_cycle():
    # Tarjan's strongly connected components over module -> imported module (package __init__ files excluded:
    # a package re-exporting its children is not a cycle of behaviour).
    nodes = {m for m in GRAPH if not _exists_package(m)}
    edges = {m: {t for t in GRAPH[m] if t in nodes} for m in nodes}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def _exists_package(module: str) -> bool:
    return (PACKAGE.parent / pathlib.Path(*module.split(".")) / "__init__.py").exists()


def test_the_core_names_no_method():
    names = ("tgate", "deepcache", "todo", "toca")
    offenders = []
    for path in sorted((PACKAGE / "core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in names:
                offenders.append(f"{path.name}:{node.lineno} {node.value!r}")
    assert not offenders, offenders
