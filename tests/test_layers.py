"""The import graph: no module imports a higher layer, and no modules import each other in a cycle
(function-local imports count too: a lazy import hides a cycle, it does not remove it)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# bottom to top; a module may import its own layer or lower ones. The first matching prefix wins.
LAYERS = [
    ("jaxlm.errors", 0), ("jaxlm.schema", 0), ("jaxlm.pytree", 0), ("jaxlm.kernels", 0), ("jaxlm.models", 0),
    ("jaxlm.model", 1),
    ("jaxlm.data", 2),
    ("jaxlm.parallel", 3), ("jaxlm.checkpoint", 3),
    ("jaxlm.train", 4), ("jaxlm.align", 4), ("jaxlm.infer", 4), ("jaxlm.eval", 4), ("jaxlm.scaling", 4),
    ("jaxlm.recipes", 4), ("jaxlm.convert", 4), ("jaxlm.config", 4), ("jaxlm.sweep", 4),
    ("jaxlm.configs", 5), ("jaxlm.cli", 5),
]
# within the library layer, some directions are still wrong
FORBIDDEN = [
    ("jaxlm.align", "jaxlm.infer"),  # analysis gets a sampler passed in
    ("jaxlm.train", "jaxlm.infer"),
    ("jaxlm.train", "jaxlm.config"),
    ("jaxlm.train", "jaxlm.sweep"),
    ("jaxlm.infer", "jaxlm.train"),
]


def _files():
    roots = {"jaxlm": REPO / "jaxlm", "jaxlm.kernels": REPO / "kernels", "jaxlm.configs": REPO / "configs"}
    for pkg, root in roots.items():
        for f in root.rglob("*.py"):
            rel = f.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "jaxlm" and parts and parts[0] in ("kernels", "configs"):
                continue
            yield ".".join([pkg, *parts]), f


def _imports(name, path):
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from pkg import submodule`
    return {m for m in out if m and m.startswith("jaxlm")}


def _graph():
    modules = dict(_files())
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(name, path) if m in modules and m != name}
    return graph


def layer(name):
    for prefix, n in LAYERS:
        if name == prefix or name.startswith(prefix + "."):
            return n
    return 0 if name == "jaxlm" else None


def test_every_module_has_a_layer():
    assert [m for m in _graph() if layer(m) is None] == []


def test_no_import_of_a_higher_layer():
    bad = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})" for m, deps in _graph().items() for d in deps
           if layer(d) > layer(m)]
    bad += [f"{m} imports {d}" for m, deps in _graph().items() for d in deps for a, b in FORBIDDEN
            if (m == a or m.startswith(a + ".")) and (d == b or d.startswith(b + "."))]
    assert bad == []


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ importing its submodules is not a cycle with them
    edges = {m: {d for d in deps if not (m.startswith(d + ".") and d in graph)} for m, deps in graph.items()}
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert cycles == []


def test_the_checker_finds_a_cycle_and_a_wrong_way_import():
    """The checks above are not vacuous: a planted cycle and a planted wrong-way import are found."""
    import pytest

    graph = {"jaxlm.model.a": {"jaxlm.model.b"}, "jaxlm.model.b": {"jaxlm.model.a"}}
    saved = globals()["_graph"]
    globals()["_graph"] = lambda: graph
    try:
        with pytest.raises(AssertionError):
            test_no_import_cycles()
        graph.clear()
        graph.update({"jaxlm.model.a": {"jaxlm.train.loop"}, "jaxlm.train.loop": set()})
        with pytest.raises(AssertionError):
            test_no_import_of_a_higher_layer()
    finally:
        globals()["_graph"] = saved
