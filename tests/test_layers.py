"""The package's layering (docs/architecture.md): no import circle, the backends named only in the routing table and
the backends' own files, the reference used at run time only by the reference backend."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastft"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(path: Path, modules: dict) -> set[str]:
    """The fastft modules a file imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if alias.name == "_C":  # the compiled extension, not a Python module of the tree
                    continue
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {name for name in found if name in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                components.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return components


def test_no_import_circle():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_backends_are_named_only_in_the_routing_table_and_the_backends_files():
    pattern = re.compile(r"backend ==|from fastft\.kernels|native_extension\(\)")
    allowed = {PACKAGE / "ops" / "backend.py", PACKAGE / "ops" / "routing.py"}
    searched = [*(PACKAGE / "ops").glob("*.py"), *PACKAGE.glob("*.py"), *(PACKAGE / "nn").rglob("*.py"),
                *(PACKAGE / "methods").rglob("*.py")]
    offenders = [f"{path.relative_to(PACKAGE)}:{number}" for path in searched if path not in allowed
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert len(searched) > 20 and offenders == []


def test_reference_is_imported_at_run_time_only_by_the_reference_backend():
    """The specification is the reference backend's source and the test oracle; the definitions it shares with the
    run-time code (tables, option domains, validators) are in fastft/formats."""
    modules = _modules()
    users = {name for name, path in modules.items()
             if not name.startswith(("fastft.reference", "fastft.bench"))
             and any(imported.startswith("fastft.reference") for imported in _imports(path, modules))}
    assert users == {"fastft.ops.backends.reference"}


def test_formats_depend_on_no_other_part_of_fastft():
    modules = _modules()
    formats = {name: path for name, path in modules.items() if name.startswith("fastft.formats")}
    imported = set().union(*(_imports(path, modules) for path in formats.values()))
    assert len(formats) >= 4 and {name for name in imported if not name.startswith("fastft.formats")} == set()


def test_every_routed_op_has_a_reference_implementation():
    from fastft.ops.routing import routes

    table = routes()
    assert len(table) >= 17
    assert all("reference" in implementations for implementations in table.values())
    assert {"native", "triton", "reference"} <= set(table["nf4_linear"])
