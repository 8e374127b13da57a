"""One dependency direction: zobench's import graph drawn as layers (docs/architecture.md), checked here.

Every import of every module under zobench/ is an edge, wherever it stands (top of the module or, in a gate,
inside a function), and so is every name a registry resolves later ("zobench.driver:run_suite"). A module
may import its own layer and the layers below, never one above; packages never import each
other in a circle; and only the gate modules import inside a function (ruff's PLC0415 says the same; this
test needs no ruff). A failure lists the offending edges, file and line.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "zobench"

# Top to bottom. A module belongs to the first entry that is its name or a package above it; MODULES names
# the modules that sit in another layer than their folder (docs/architecture.md says why).
LAYERS = [
    ("entry", ("zobench.cli", "zobench.api", "zobench.progress")),
    ("driver", ("zobench.driver",)),
    ("executors", ("zobench.executors",)),
    ("readers", ("zobench.influence", "zobench.analysis", "zobench.report")),
    ("cell", ("zobench.cell",)),
    ("methods", ("zobench.methods",)),
    ("backends", ("zobench.quant", "zobench.models", "zobench.tasks")),
    ("engine", ("zobench.zo",)),
    ("ground", ("zobench.measure", "zobench.data", "zobench.files", "zobench.results", "zobench.spec",
                "zobench.registry", "zobench.errors", "zobench.outdirs", "zobench.procs", "zobench.fingerprint",
                "zobench.gates", "zobench")),
]
# The record schema is pure data that the results file, the readers and the cell all share: it sits beside
# the pipeline that fills it, and belongs to the ground.
MODULES = {"zobench.cell.record": "ground", "zobench.cell.measures": "ground",
           "zobench.cell.influence_record": "ground", "zobench.cell.predictions": "ground"}
# Edges the layers alone would allow, refused all the same (importer prefix, imported prefix, why).
FORBIDDEN = [
    ("zobench.quant", "zobench.zo", "quantization knows no ZO engine: masks and layer names come as values"),
    ("zobench.measure", "zobench.cell", "measure returns numbers; the cell builds the record"),
]
# The only modules that import inside a function (pyproject.toml's per-file ignores say the same).
GATES = re.compile(r"^zobench\.gates(\.\w+)?$|^zobench\.executors\.child$")
LAZY_NAME = re.compile(r"^(zobench(?:\.\w+)+):\w+$")  # a registry's "module:attr"


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULE_NAMES = module_names()


def resolve(name: str) -> str | None:
    """The zobench module an import names (``from zobench.x import y``: y if it is a module, else x)."""
    while name and name not in MODULE_NAMES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, path: Path) -> list[tuple[str, int, str]]:
    """(zobench module, line, kind) for every import and registry name of ``module``; kind is "top" (an
    import at module level), "function" (inside a function) or "name" (a registry's "module:attr")."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            kind = "function" if in_function else "top"
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, kind) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the module's own package
                    pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - child.level + 1] + ([child.module] if child.module else []))
                out.extend((f"{base}.{a.name}" if resolve(f"{base}.{a.name}") == f"{base}.{a.name}" else base,
                            child.lineno, kind) for a in child.names)
            elif isinstance(child, ast.Constant) and isinstance(child.value, str) and LAZY_NAME.match(child.value):
                out.append((LAZY_NAME.match(child.value).group(1), child.lineno, "name"))
            visit(child, nested)

    visit(tree, False)
    return [(resolve(name), line, kind) for name, line, kind in out if name.startswith("zobench") and resolve(name)]


def layer_of(module: str) -> int:
    if module in MODULES:
        return [name for name, _ in LAYERS].index(MODULES[module])
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "zobench"):
            return i
    if module == "zobench":
        return len(LAYERS) - 1
    raise AssertionError(f"{module}: in no layer; add it to LAYERS in tests/test_layers.py and to "
                         f"docs/architecture.md")


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def edges() -> list[tuple[str, str, int, str]]:
    return [(m, target, line, kind) for m, path in sorted(MODULE_NAMES.items())
            for target, line, kind in imports(m, path) if target != m]


def upward(edge_list) -> list[str]:
    """The edges from a module to a layer above its own."""
    names = [name for name, _ in LAYERS]
    return [f"{MODULE_NAMES[m].relative_to(PACKAGE.parent)}:{line}: {m} ({names[layer_of(m)]}) imports {t} "
            f"({names[layer_of(t)]})"
            for m, t, line, _ in edge_list if layer_of(t) < layer_of(m)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_every_module_is_in_a_layer():
    for module in MODULE_NAMES:
        layer_of(module)


def test_no_module_imports_a_layer_above_its_own():
    bad = upward(edges())
    assert not bad, "imports against the layers (docs/architecture.md):\n" + "\n".join(bad)


def test_no_forbidden_edge():
    bad = [f"{MODULE_NAMES[m].relative_to(PACKAGE.parent)}:{line}: {m} imports {t}: {why}"
           for m, t, line, _ in edges() for a, b, why in FORBIDDEN
           if (m == a or m.startswith(a + ".")) and (t == b or t.startswith(b + "."))]
    assert not bad, "\n".join(bad)


def test_the_check_names_an_upward_edge():
    """A lower layer importing a higher one is reported with its file, line and both layers."""
    bad = upward([("zobench.spec.config", "zobench.methods.base", 7, "top"),
                  ("zobench.methods.base", "zobench.spec.config", 8, "top"),
                  ("zobench.cell.record", "zobench.cell.pipeline", 9, "function")])
    assert bad == ["zobench/spec/config.py:7: zobench.spec.config (ground) imports zobench.methods.base (methods)",
                   "zobench/cell/record.py:9: zobench.cell.record (ground) imports zobench.cell.pipeline (cell)"]


def test_no_circles_between_modules_or_packages():
    modules: dict[str, set[str]] = {}
    packages: dict[str, set[str]] = {}
    for m, t, _, _ in edges():
        modules.setdefault(m, set()).add(t)
        if package_of(m) != package_of(t):
            packages.setdefault(package_of(m), set()).add(package_of(t))
    assert not cycles(modules), f"import circles between modules: {cycles(modules)}"
    assert not cycles(packages), f"import circles between packages: {cycles(packages)}"
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_only_gate_modules_import_inside_a_function():
    lazy = [f"{MODULE_NAMES[m].relative_to(PACKAGE.parent)}:{line}: {t}" for m, t, line, kind in edges()
            if kind == "function" and not GATES.match(m)]
    assert not lazy, "imports inside functions outside the gate modules:\n" + "\n".join(lazy)


@pytest.mark.parametrize("gate", sorted(m for m in MODULE_NAMES if GATES.match(m)))
def test_a_gate_imports_only_the_ground(gate):
    assert layer_of(gate) in (len(LAYERS) - 1, layer_of("zobench.executors")), gate
    if gate.startswith("zobench.gates"):
        heavy = [t for t, _, _ in imports(gate, MODULE_NAMES[gate]) if layer_of(t) != len(LAYERS) - 1]
        assert not heavy, f"{gate} imports {heavy}: a gate stands in the ground"
