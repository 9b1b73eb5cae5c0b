"""The package's shape: imports flow agent -> streaming/engine -> kernels, and nothing imports in a circle.

Every import statement of every module is read (module level and inside functions; imports under
`if TYPE_CHECKING:` are annotations, not dependencies, and are left out), resolved to the module it
names, and checked against the layers:

    rejoinder.agent            may import streaming, engine, kernels
    livekit.plugins.rejoinder  may import streaming, engine, kernels (not agent: it is a plugin of livekit)
    rejoinder.streaming        may import kernels, never engine or agent
    rejoinder.engine           may import kernels, never streaming or agent
    rejoinder.kernels          imports none of the others
    rejoinder (errors)         the base every layer may import; imports none of them

and the module graph must have no cycle. `python tests/test_structure.py` prints the layer graph.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"agent": "rejoinder.agent", "streaming": "rejoinder.streaming", "engine": "rejoinder.engine",
           "kernels": "rejoinder.kernels", "livekit_plugin": "livekit.plugins.rejoinder", "rejoinder": "rejoinder"}
ALLOWED = {
    "rejoinder.agent": {"rejoinder.streaming", "rejoinder.engine", "rejoinder.kernels", "rejoinder"},
    "livekit.plugins.rejoinder": {"rejoinder.streaming", "rejoinder.engine", "rejoinder.kernels", "rejoinder"},
    "rejoinder.streaming": {"rejoinder.kernels", "rejoinder"},
    "rejoinder.engine": {"rejoinder.kernels", "rejoinder"},
    "rejoinder.kernels": {"rejoinder"},
    "rejoinder": set(),
}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _layer(module: str) -> str | None:
    for package in sorted(FOLDERS.values(), key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    return None


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ours that `module` imports at run time."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    found.add(a.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                subs = {f"{target}.{a.name}" for a in child.names}
                named_modules = subs & known
                found.update(named_modules)  # `from . import config` depends on that module only
                if named_modules != subs:
                    found.add(target)
            visit(child)

    visit(tree)
    out = set()
    for name in found:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def layer_edges(graph: dict[str, set[str]]) -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for src, targets in graph.items():
        for dst in targets:
            a, b = _layer(src), _layer(dst)
            if a != b and a is not None and b is not None:
                edges[(a, b)].append(f"{src} -> {dst}")
    return edges


def test_every_module_is_read():
    graph = import_graph()
    assert len(graph) > 60
    assert {"rejoinder.agent.session", "rejoinder.engine.engine", "rejoinder.kernels.ggml",
            "livekit.plugins.rejoinder.llm", "rejoinder.errors"} <= set(graph)
    # The walker sees through relative and function-level imports, but not TYPE_CHECKING ones.
    assert "rejoinder.agent.session" in graph["rejoinder.agent.serving"]
    assert "rejoinder.agent.session" in graph["rejoinder.agent.cli.livekit"]  # imported inside a function
    assert "rejoinder.agent.session" not in graph["rejoinder.agent.speaker"]  # TYPE_CHECKING only


def test_imports_flow_down_the_layers():
    bad = []
    for (a, b), where in sorted(layer_edges(import_graph()).items()):
        if b not in ALLOWED[a]:
            bad += where
    assert not bad, "imports against the layer direction:\n" + "\n".join(bad)


def test_no_import_cycle():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_can_fail():
    # A cycle and a wrong-way edge are found when they exist.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    edges = layer_edges({"rejoinder.engine.x": {"rejoinder.streaming.y"}, "rejoinder.streaming.y": set()})
    assert ("rejoinder.engine", "rejoinder.streaming") in edges
    assert "rejoinder.streaming" not in ALLOWED["rejoinder.engine"]


if __name__ == "__main__":
    g = import_graph()
    for (a, b), where in sorted(layer_edges(g).items()):
        ok = "ok " if b in ALLOWED[a] else "BAD"
        print(f"{ok} {a:28s} -> {b:22s} {len(where):3d} import(s)")
    print(f"{len(g)} modules, {sum(map(len, g.values()))} imports, cycles: {_cycles(g) or 'none'}")
