"""Import-graph helpers shared by the layering tests (tests/test_layering_*.py)."""
from __future__ import annotations


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


# ----------------------------------------------------------------------------- the stamp import graph
def _module_name(path, root) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _lazy_names(source: str) -> dict[str, str]:
    """A package's ``_LAZY`` table (public name -> module it loads on first use)."""
    import ast

    out: dict[str, str] = {}
    for node in ast.parse(source).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if getattr(target, "id", "") == "_LAZY" and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                module = ast.literal_eval(value)
                out[ast.literal_eval(key)] = module[0] if isinstance(module, tuple) else module
    return out


def import_graph(root, package: str = "stamp", overrides: dict[str, str] | None = None) -> dict[str, set[str]]:
    """Every edge module -> module inside ``package`` that can run: imports at module level AND inside
    functions, ``importlib.import_module("...")`` with a literal name, and lazy package attributes
    (``import stamp; stamp.load(...)`` or ``from stamp import load`` is an edge to the module that
    ``stamp._LAZY`` names). Imports under ``if TYPE_CHECKING:`` never run and are not edges.
    ``overrides`` replaces a module's source (to prove that a test catches a bad import)."""
    import ast

    sources = {_module_name(p, root): p.read_text() for p in root.rglob("*.py")}
    sources.update(overrides or {})
    modules = set(sources)
    lazy = {m: _lazy_names(src) for m, src in sources.items() if "_LAZY" in src}

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    def attribute_edge(node) -> str | None:
        chain = []
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        if not (isinstance(node, ast.Name) and node.id == package):
            return None
        chain = [package, *reversed(chain)]
        for i in range(len(chain) - 1, 0, -1):
            prefix = ".".join(chain[:i])
            if prefix in lazy and chain[i] in lazy[prefix]:
                return lazy[prefix][chain[i]]
            if prefix in modules and prefix != package:
                return prefix
        return None

    graph: dict[str, set[str]] = {}
    for me, source in sources.items():
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(owner(a.name) for a in node.names if a.name.split(".")[0] == package)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level \
                    and node.module.split(".")[0] == package:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    found.add(full if full in modules else lazy.get(node.module, {}).get(a.name) or owner(node.module))
            elif isinstance(node, ast.Attribute):
                found.add(attribute_edge(node) or "")
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                    "import_module" and node.args and isinstance(node.args[0], ast.Constant) \
                    and str(node.args[0].value).split(".")[0] == package:
                found.add(owner(node.args[0].value))
        graph[me] = found - {"", me, package}
    return graph
