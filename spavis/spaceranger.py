"""Space Ranger output file names: the one table readers, fetch sources, discovery and the
simulator share (standard library only).

Names are matched case-insensitively on the END of a file name after a trailing ``.gz`` is
dropped, because GEO submitters prefix them (``GSM123_sample_tissue_positions_list.csv.gz``).
Within a role the first name is preferred (Space Ranger writes filtered and raw matrices).
"""
from __future__ import annotations

import re

SPATIAL_DIR = "spatial"
MATRIX_DIR = "filtered_feature_bc_matrix"
RAW_MATRIX_DIR = "raw_feature_bc_matrix"
OUTS_DIR = "outs"
# sub-folders that mark a folder as ONE Space Ranger slice (not a collection of slices)
INTERNAL_DIRS = frozenset({SPATIAL_DIR, MATRIX_DIR, RAW_MATRIX_DIR, OUTS_DIR, "analysis"})

MATRIX_H5 = "filtered_feature_bc_matrix.h5"
LEGACY_MATRIX_H5 = "filtered_gene_bc_matrices_h5.h5"  # Space Ranger < 1.0 / Cell Ranger 2
RAW_MATRIX_H5 = "raw_feature_bc_matrix.h5"
POSITIONS = "tissue_positions.csv"  # Space Ranger >= 2.0 (with header)
POSITIONS_LIST = "tissue_positions_list.csv"  # Space Ranger 1.x (no header)
POSITIONS_PARQUET = "tissue_positions.parquet"  # Visium HD
SCALEFACTORS = "scalefactors_json.json"
LOWRES_IMAGE = "tissue_lowres_image.png"
HIRES_IMAGE = "tissue_hires_image.png"

# role -> accepted name endings, preferred first
FILES: dict[str, tuple[str, ...]] = {
    "h5": (MATRIX_H5, LEGACY_MATRIX_H5, RAW_MATRIX_H5),
    "mtx": ("matrix.mtx",),
    "barcodes": ("barcodes.tsv",),
    "features": ("features.tsv", "genes.tsv"),
    "positions": (POSITIONS_LIST, POSITIONS, POSITIONS_PARQUET),
    "scalefactors": (SCALEFACTORS,),
    "lowres": (LOWRES_IMAGE, "tissue_lowres_image.jpg"),
    "hires": (HIRES_IMAGE,),
}


def ending_pattern(names: tuple[str, ...] | list[str]) -> str:
    """A regex alternation of file names (escaped), for matching name endings."""
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"
