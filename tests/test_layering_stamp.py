"""stamp's rooms and their order (docs/architecture.md), checked on EVERY import that can run.

Edges are read from the source (:func:`layering_helpers.import_graph`): module-level imports,
imports inside functions, ``importlib.import_module("...")`` and lazy package attributes
(``import stamp; stamp.load(...)``). Each module sits in one layer; it may import its own layer
and the layers below, never above; and nothing anywhere forms a cycle. Model classes know no
names (they import nothing of the zoo) and library code never imports the command line.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from layering_helpers import import_cycles, import_graph

ROOT = Path(__file__).resolve().parents[1] / "stamp"

# Bottom to top. A module's layer is the longest prefix that names it; "stamp" (the package's lazy
# public names) is above everything.
LAYERS: list[tuple[str, ...]] = [
    ("stamp.constants", "stamp.errors"),
    ("stamp.safety", "stamp.locations", "stamp.hub_access", "stamp.cards"),  # shared basics, no model code
    ("stamp.tokenizer",),
    ("stamp.models.pixels", "stamp.models.alignment", "stamp.models.abmil"),
    ("stamp.models",),  # the model classes: gene_encoder, vision, foundation, aligned_model
    ("stamp.zoo.catalogue", "stamp.zoo.encoder"),  # names as data; the one object consumers receive
    ("stamp.zoo.convert",),  # released checkpoints -> this project's layout
    ("stamp.zoo.resolve",),  # names / runs / Hub ids -> local folders (converts on first use)
    ("stamp.zoo",),  # factory: stamp.load
    ("stamp.data",),
    ("stamp.training", "stamp.embed"),
    ("stamp.slides",),
    ("stamp.evaluate",),
    ("stamp.hub",),  # publishing (a card may carry evaluation results)
    ("stamp.cli",),
    ("stamp",),
]
# Modules that must not import torch at module level (the catalogue is data; these load with no torch).
NO_TORCH = ("stamp.zoo.catalogue", "stamp.hub_access", "stamp.safety", "stamp.locations", "stamp.cards",
            "stamp.errors", "stamp.constants")


def layer(module: str) -> int:
    best, rank = "", None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, rank = p, i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return rank


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if layer(d) > layer(m))


def test_every_module_has_a_layer_and_imports_only_downward():
    graph = import_graph(ROOT)
    assert {layer(m) for m in graph}  # every module placed
    assert upward_edges(graph) == []


def test_no_import_cycle_inside_stamp_even_through_function_level_and_lazy_imports():
    assert import_cycles(import_graph(ROOT)) == []


def test_model_classes_know_no_names_and_library_code_never_imports_the_cli():
    graph = import_graph(ROOT)
    named = [f"{m} -> {d}" for m, deps in graph.items() if m.startswith("stamp.models")
             for d in deps if d == "stamp.hub" or d.startswith("stamp.zoo")]
    assert named == []
    cli = [f"{m} -> {d}" for m, deps in graph.items() if not m.startswith("stamp.cli")
           for d in deps if d.startswith("stamp.cli")]
    assert cli == []


def _source(module: str) -> str:
    return (ROOT.parent / (module.replace(".", "/") + ".py")).read_text()


@pytest.mark.parametrize("module,snippet,expect", [
    # a model class reaching the zoo from inside a function (the old from_pretrained(NAME) hook)
    ("stamp.models.gene_encoder", "\n\ndef _hook():\n    from stamp.zoo.factory import load\n", "upward"),
    # the same through the lazy public name
    ("stamp.models.vision", "\n\ndef _hook():\n    import stamp\n    return stamp.load\n", "upward"),
    # library code importing the command line
    ("stamp.slides.progress", "\n\ndef _c():\n    from stamp.cli._common import err_console\n", "upward"),
    # a function-level import that closes a cycle inside one layer
    ("stamp.data.batching", "\n\ndef _c():\n    from stamp.data.tokens import TokenBatchLoader\n", "cycle"),
])
def test_the_checks_catch_a_bad_import(module, snippet, expect):
    """Each rule fails on a planted import of the kind it exists for (so these tests can fail)."""
    graph = import_graph(ROOT, overrides={module: _source(module) + snippet})
    if expect == "upward":
        assert any(e.startswith(module + " -> ") for e in upward_edges(graph))
    else:
        assert any(module in c for c in import_cycles(graph))


def test_data_layers_import_no_torch_at_module_level():
    for name in NO_TORCH:
        tree = ast.parse(_source(name))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        mods = {a.name for n in top if isinstance(n, ast.Import) for a in n.names} | {
            n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in mods if m.split(".")[0] in ("torch", "timm", "transformers")}, name


def test_old_flat_module_names_are_gone_and_the_new_rooms_answer():
    """No shim is kept: none of the old names was documented as public API beyond ``stamp.X``."""
    for old in ("model", "multimodal", "registry", "train", "train_align", "training_loop", "factory",
                "gene_encoder", "embeddings", "catalogue", "convert", "vision", "paired_data", "embed"):
        assert not (ROOT / f"{old}.py").exists(), old
    import stamp
    from stamp.models.aligned_model import StampModel
    from stamp.models.gene_encoder import StampGeneEncoder
    from stamp.zoo.factory import create_pretrained_model, load

    assert stamp.StampModel is StampModel and stamp.StampGeneEncoder is StampGeneEncoder
    assert stamp.load is load and stamp.create_model is create_pretrained_model


def test_error_classes_live_in_stamp_errors():
    """``stamp.errors`` holds every error class stamp raises on purpose (other modules re-export)."""
    defined = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "errors.py" and path.parent == ROOT:
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Exception")):
                defined.append(f"{path.relative_to(ROOT.parent)}: {node.name}")
    assert defined == []
