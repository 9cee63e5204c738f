"""No import cycle inside ``stamp`` (AST scan of every import, function-level ones included).

The zoo's layers, bottom to top: catalogue (data) <- model classes <- factory <- convert /
publish / commands. A model class may reach the factory through ONE documented lazy hook
(``from_pretrained("stamp-v1")`` turns a name into a folder there); that edge is the only
exception and is listed below.
"""
from __future__ import annotations

import ast
from pathlib import Path

from layering_helpers import import_cycles

ROOT = Path(__file__).resolve().parents[1] / "stamp"

# (importer, imported): upward edges allowed on purpose, each a lazy import inside a function.
ALLOWED_UPWARD = {
    ("stamp.gene_encoder", "stamp.factory"),  # StampGeneEncoder.from_pretrained(NAME): the name -> folder hook
    ("stamp.aligned_model", "stamp.factory"),  # StampModel.from_pretrained(NAME): same hook
}
# Modules that must not import torch at module level (the catalogue is data).
NO_TORCH = ("stamp.catalogue", "stamp.hub_access", "stamp.safety", "stamp.locations", "stamp.cards")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """stamp modules ``path`` imports (``from stamp.x import y`` counts y when it is a module)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # imports under `if TYPE_CHECKING:` never run: not edges
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found: set[str] = set()
    me = module_name(path)
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me and name != "stamp":
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {m: imports_of(p, set(files)) for m, p in files.items()}


def test_no_import_cycle_inside_stamp():
    edges = {m: {d for d in deps if (m, d) not in ALLOWED_UPWARD} for m, deps in graph().items()}
    assert import_cycles(edges) == []


def test_model_classes_know_no_names():
    """Model classes import neither the catalogue, the Hub module nor the factory (but the one hook)."""
    edges = graph()
    for cls_module in ("stamp.gene_encoder", "stamp.aligned_model", "stamp.vision", "stamp.foundation",
                       "stamp.tokenizer.core"):
        upward = {d for d in edges[cls_module] if d in ("stamp.catalogue", "stamp.registry", "stamp.hub",
                                                        "stamp.factory", "stamp.convert")}
        assert upward <= {d for m, d in ALLOWED_UPWARD if m == cls_module}, (cls_module, upward)


def test_data_layers_import_no_torch_at_module_level():
    for name in NO_TORCH:
        tree = ast.parse((ROOT / (name.split(".", 1)[1].replace(".", "/") + ".py")).read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        mods = {a.name for n in top if isinstance(n, ast.Import) for a in n.names} | {
            n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in mods if m.split(".")[0] in ("torch", "timm", "transformers")}, name


def test_old_module_names_are_the_new_modules():
    """stamp.model / stamp.multimodal (earlier names) ARE stamp.gene_encoder / stamp.aligned_model."""
    import stamp.aligned_model
    import stamp.gene_encoder
    import stamp.model
    import stamp.multimodal
    from stamp.model import StampGeneEncoder, create_model
    from stamp.multimodal import PROJECTIONS, StampModel

    assert stamp.model is stamp.gene_encoder and stamp.multimodal is stamp.aligned_model
    assert StampGeneEncoder is stamp.gene_encoder.StampGeneEncoder and StampModel is stamp.aligned_model.StampModel
    assert create_model is stamp.gene_encoder.create_gene_encoder and PROJECTIONS
    from stamp import StampGeneEncoder as public, StampModel as public_model, create_model as zoo_create

    assert public is StampGeneEncoder and public_model is StampModel and zoo_create is not create_model
