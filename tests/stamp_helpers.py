"""Small shard corpora for the stamp tests and the learning benchmark, from GENERATED slices.

Built with the real pipeline: ``spavis.simulate.write_simulated_slice`` writes Space Ranger-like
folders (real Ensembl ids: the first ``n_genes`` human genes of the stamp-v1 vocabulary), and
``spavis.build.build_shards`` turns them into shards with a vocabulary of exactly those genes
(so the tiny model's vocabulary stays small and tests stay fast). ``max_row`` keeps a strip of
the capture area (rows ``< max_row``) so slices hold a few hundred spots. Everything here is
generated data, not measurements.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from spavis.build import build_shards
from spavis.genes import Vocabulary, load_vocabulary
from spavis.simulate import write_simulated_slice


@lru_cache(maxsize=4)
def gene_subset(n_genes: int) -> Vocabulary:
    """The first ``n_genes`` human genes of stamp-v1, as a vocabulary of their own."""
    stamp = load_vocabulary("stamp-v1")
    ids = [str(e) for e in stamp.ensembl_ids if str(e).startswith("ENSG")][:n_genes]
    return Vocabulary(f"stamp-v1-first-{n_genes}", ids, [stamp.symbols[stamp.index[e]] for e in ids],
                      source="stamp-v1 subset (tests)")


def make_corpus(
    root: Path,
    *,
    slides: int = 1,
    n_genes: int = 300,
    max_row: int | None = 30,
    n_domains: int = 4,
    seed: int = 0,
    k: int = 8,
    n_markers: int | None = None,
    tissue_fraction: float | None = None,
    min_genes: int = 5,
) -> tuple[Path, dict[str, str]]:
    """Build a corpus at ``root`` (one slide per shard); returns (root, {spot_id: true domain}).

    Slides are ``gen0``, ``gen1`` ... (seeds ``seed``, ``seed + 1`` ...); ``n_markers`` per
    domain defaults to a tenth of the genes (at least 10).
    """
    root = Path(root)
    vocab = gene_subset(n_genes)
    inputs = root.parent / f".{root.name}-inputs"
    folders = []
    for s in range(slides):
        folder = inputs / f"gen{s}"
        if not folder.is_dir():
            write_simulated_slice(folder, genes=list(vocab.ensembl_ids), symbols=list(vocab.symbols),
                                  seed=seed + s, n_domains=n_domains, with_image=False, max_row=max_row,
                                  tissue_fraction=tissue_fraction,
                                  n_markers=n_markers if n_markers is not None else max(10, n_genes // 10))
        folders.append(folder)
    build_shards(folders, root, vocab=vocab, min_genes=min_genes, k_neighbors=k, max_spots_per_shard=1)
    domains = {}
    for folder in folders:
        truth = json.loads((folder / "generated.json").read_text())["domains"]
        domains.update({f"{folder.name}:{bc}": d for bc, d in truth.items()})
    kept = _spot_ids(root)
    return root, {s: domains[s] for s in kept}


def _spot_ids(root: Path) -> list[str]:
    from spavis.corpus import open_corpus

    ids: list[str] = []
    for table in open_corpus(root).iter_slides(columns=["spot_id"]):
        ids += table.column("spot_id").to_pylist()
    return ids
