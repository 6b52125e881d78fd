"""The import graph of src/gemmakit has no cycles: arrows point from front ends (cli, serve, eval, safety
commands) down to the engine, the model and small helpers, never back up.

Every `import gemmakit...` and `from gemmakit... import ...` counts, at module level and inside functions
(a lazy import that closes a cycle is still a cycle: the two modules cannot be understood, tested or moved
apart), and so do relative imports. Imports under `if TYPE_CHECKING:` count too; they are annotations only,
but an annotation that points back up is the same tangle.

How names resolve: `from gemmakit.x import y` is an arrow to `gemmakit.x.y` when that is a module, else to
`gemmakit.x` (a package's `__init__.py` is the module `gemmakit.x`). Importing `gemmakit.x.y` also runs the
`__init__` of `gemmakit` and `gemmakit.x`, but that is Python's doing, not a dependency the code chose, so
parents are not arrows. `gemmakit/__init__.py` may re-export the public API (it imports `gemmakit.api`
lazily in `load`); that is allowed exactly as long as no module imports the top-level package `gemmakit`
back, which would close a cycle through it and which this test then reports.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "gemmakit"


def module_files(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package (a package's __init__ is the package)."""
    files = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([name] if name else [])])


def imports_of(module: str, path: Path, modules: set[str], package: str = PACKAGE) -> set[str]:
    """The package's modules that `module` imports anywhere in its file (see the module docstring)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def owner(dotted: str) -> str | None:
        """The longest prefix of `dotted` that is one of our modules."""
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in modules:
                return ".".join(parts[:i])
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := owner(alias.name)) is not None:  # None: not one of ours
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            source = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                      else node.module or "")
            if source != package and not source.startswith(package + "."):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                target = submodule if submodule in modules else owner(source)
                if target is not None:
                    found.add(target)
    found.discard(module)
    return found


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    files = module_files(src, package)
    return {m: imports_of(m, p, set(files), package) for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None. Depth-first search with colours, in sorted order so the
    report is stable."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt, BLACK) == GREY:
                return [*stack[stack.index(nxt):], nxt]
            if colour.get(nxt) == WHITE and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE and (cycle := visit(node)):
            return cycle
    return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (each holds at least one cycle), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(groups)


def test_the_walker_sees_every_kind_of_import(tmp_path):
    """Module-level, function-level, `from package import submodule`, relative imports and a package's
    __init__ are all read the way the module docstring says."""
    pkg = tmp_path / "pk"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def load():\n    from pk.api import load\n")
    (pkg / "api.py").write_text("import pk.sub.b\nfrom pk.sub import a\n")
    (pkg / "sub" / "__init__.py").write_text("from .a import thing\n")
    (pkg / "sub" / "a.py").write_text("thing = 1\n")
    (pkg / "sub" / "b.py").write_text("from pk.sub import thing\n\ndef f():\n    from .. import api\n")
    graph = import_graph(tmp_path, "pk")
    assert graph == {"pk": {"pk.api"}, "pk.api": {"pk.sub.a", "pk.sub.b"}, "pk.sub": {"pk.sub.a"},
                     "pk.sub.a": set(), "pk.sub.b": {"pk.sub", "pk.api"}}
    assert find_cycle(graph) == ["pk.api", "pk.sub.b", "pk.api"]  # closed by the lazy import in b.f
    assert all_cycles(graph) == [["pk.api", "pk.sub.b"]]


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert "gemmakit.engine" in graph and "gemmakit.cli" in graph  # the walker found the package
    groups = all_cycles(graph)
    if groups:
        lines = []
        for group in groups:
            sub = {m: graph[m] & set(group) for m in group}
            lines.append(" -> ".join(find_cycle(sub) or group) + f"   (tangled together: {', '.join(group)})")
        raise AssertionError("import cycles in src/gemmakit (make the arrow point down: move the shared code "
                             "into a lower module, or hand it in):\n  " + "\n  ".join(lines))


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_low_modules_do_not_reach_up():
    """The sampler gets watermarks and other logits processors handed in; it never imports safety/ or a front
    end. flags.py is read by every layer, so it imports nothing of ours."""
    graph = import_graph()
    above = ("gemmakit.safety", "gemmakit.serve", "gemmakit.eval", "gemmakit.train", "gemmakit.cli",
             "gemmakit.cli_common", "gemmakit.repl", "gemmakit.api")
    up = sorted(m for m in reachable(graph, "gemmakit.sampling") if m.startswith(above))
    assert not up, f"gemmakit.sampling reaches up into {up}"
    assert graph["gemmakit.flags"] == set()
