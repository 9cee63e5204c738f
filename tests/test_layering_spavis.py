"""No import cycle anywhere inside ``spavis`` (module-level imports, read from the source with ``ast``).

A cycle makes the import order decide whether a name exists yet (``shards/config.py`` and
``shards/prepare.py`` used to import each other, hidden behind a function-level import).
Imports inside functions are deliberate lazy loads and are not edges; neither are those under
``if TYPE_CHECKING:``. ``from spavis.x import y`` is an edge to ``spavis.x.y`` when that is a
module, else to ``spavis.x``.
"""
from __future__ import annotations

import ast
from pathlib import Path

from layering_helpers import import_cycles

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "spavis"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _module_level(body: list[ast.stmt]):
    """Import statements executed when the module is imported (not in functions or TYPE_CHECKING)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if "TYPE_CHECKING" not in test:
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level(block)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in _module_level(ast.parse(path.read_text(encoding="utf-8")).body):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        for t in targets:
            while t and t not in modules and "." in t:
                t = t.rpartition(".")[0]
            if t in modules and t != name and t.split(".")[0] == PACKAGE:
                out.add(t)
    return out


def test_no_import_cycle_inside_spavis():
    modules = _modules()
    graph = {name: _edges(name, path, modules) for name, path in modules.items()}
    assert graph["spavis.shards.prepare"] >= {"spavis.shards.config"}  # the scan sees real edges
    assert import_cycles(graph) == []


def test_shards_config_imports_none_of_the_build_steps():
    """BuildConfig sits below prepare/write/builder, also in its lazy (function-level) imports."""
    tree = ast.parse((ROOT / PACKAGE / "shards" / "config.py").read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    steps = {f"spavis.shards.{m}" for m in ("prepare", "write", "builder", "workers", "discover")}
    assert not imported & steps, imported & steps


def test_the_scan_finds_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
