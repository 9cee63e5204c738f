"""Layers inside stamp and spavis.format that the run contract and the cross-package concepts rely on:
stamp.training imports nothing of evaluation, embedding or slide reading; the new spavis.format modules
import nothing of fetch (spavis.sources) or build (spavis.shards), and the vocabulary module stays
standard-library only (fetch reads CONDITIONS from it without loading pyarrow)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every absolute module name a file imports (top level or inside functions), with ``from X import y``
    also as ``X.y`` (so ``from stamp import embed`` counts as stamp.embed.genes)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _offending(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(ROOT)}: imports {name}" for p in files for name in sorted(_imports(p))
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


def test_stamp_training_imports_nothing_of_evaluate_embed_or_slides():
    files = sorted((ROOT / "stamp" / "training").rglob("*.py"))
    assert {p.name for p in files} >= {"__init__.py", "run.py", "gene.py", "align.py", "tokenize.py"}
    forbidden = ("stamp.evaluate", "stamp.embed.genes", "stamp.embed.multimodal", "stamp.slides", "stamp.cli",
                 "openslide")
    assert _offending(files, forbidden) == []


def test_new_spavis_format_modules_import_nothing_of_fetch_or_build():
    files = [ROOT / "spavis" / "format" / f"{name}.py" for name in ("vocabulary", "coordinates")]
    forbidden = ("spavis.sources", "spavis.shards", "spavis.readers", "spavis.genes", "spavis.cli", "stamp")
    assert _offending(files, forbidden) == []


def test_vocabulary_module_and_fetch_sidecar_stay_free_of_pyarrow():
    code = ("import sys, spavis.format.vocabulary, spavis.sources.sidecar, spavis.manifests; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyarrow', 'pandas', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
