"""Human gene table, gene vocabularies and Ensembl harmonization of slice features."""
from __future__ import annotations

from spavis.genes.harmonize import Harmonized, MappingReport, feature_names, harmonize
from spavis.genes.table import GeneTable, Resolution, load_gene_table, resolve
from spavis.genes.vocab import PRESETS, Vocabulary, VocabularyError, load_vocabulary

__all__ = [
    "GeneTable", "Harmonized", "MappingReport", "PRESETS", "Resolution", "Vocabulary",
    "VocabularyError", "feature_names", "harmonize", "load_gene_table", "load_vocabulary", "resolve",
]
