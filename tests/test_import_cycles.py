"""No import circles inside the package: a walk over every ``import`` in ``src/dynwire`` (ast).

Every import counts, wherever it is written: at module level, inside a function (a lazy import
is still a dependency) and under ``if TYPE_CHECKING:``. ``from pkg import name`` depends on the
module ``pkg.name`` when that is a module, else on ``pkg`` itself. A parent package's
``__init__`` is not an implicit dependency of its submodules (that would make every re-export
a circle). Run as a script, it prints the import graph's circles::

    python tests/test_import_cycles.py [SRC_DIR]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Circles that are known and being removed elsewhere; each entry is one whole circle (a strongly
# connected component of the import graph), and only exactly that set of modules is let through.
ALLOWED: list[frozenset[str]] = []


def modules(src: Path, package: str = "dynwire") -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every ``.py`` under ``src/package``."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def import_graph(src: Path, package: str = "dynwire") -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (anywhere in its source)."""
    mods = modules(src, package)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        here = name if is_pkg else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:
                    if f"{target}.{a.name}" in mods:
                        deps.add(f"{target}.{a.name}")
                    elif target in mods:
                        deps.add(target)
        deps.discard(name)
        graph[name] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(frozenset(comp))
    return found


def describe(circle: frozenset[str], graph: dict[str, set[str]]) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & circle))}" for m in sorted(circle))


def test_the_package_has_no_import_circle() -> None:
    graph = import_graph(SRC)
    assert len(graph) > 50 and "dynwire.deploy.files" in graph["dynwire._registry"]
    bad = [c for c in circles(graph) if c not in ALLOWED]
    assert not bad, "import circles:\n" + "\n".join(describe(c, graph) for c in bad)


def test_the_walk_finds_circles_of_every_kind(tmp_path: Path) -> None:
    """A lazy import, a TYPE_CHECKING import and ``from . import module`` each close a circle."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import f\n",
        "a.py": "def f():\n    from .b import g\n    return g\n",  # lazy
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\ng = 1\n",
        "c.py": "from .sub import d\n",  # the module pkg.sub.d
        "sub/__init__.py": "",
        "sub/d.py": "from .. import c\n",
        "e.py": "import pkg.sub\n",  # a package, no circle
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.c"] == {"pkg.sub.d"} and graph["pkg.e"] == {"pkg.sub"}
    assert sorted(map(sorted, circles(graph))) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub.d"]]


if __name__ == "__main__":  # pragma: no cover
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else SRC
    g = import_graph(src)
    found = circles(g)
    for c in found:
        print(("allowed: " if c in ALLOWED else "") + describe(c, g))
    sys.exit(1 if [c for c in found if c not in ALLOWED] else 0)
