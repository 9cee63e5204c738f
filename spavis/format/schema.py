"""The shard format: Arrow schemas, Parquet writer settings and layout names (a user contract)."""
from __future__ import annotations

from typing import Any

import pyarrow as pa

from spavis.format.io import json_dumps  # noqa: F401  (canonical JSON of every metadata file)

FORMAT_NAME = "spavis-shards"
FORMAT_VERSION = 2  # 2: slides.parquet um_per_px, um_per_px_method, max_count, counts_exceed_float32, warnings

EXPRESSION_DIR = "data/expression"
GENES_FILE = "genes.parquet"
SLIDES_FILE = "slides.parquet"
ZARR_DIR = "zarr"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"
EXPRESSION_GLOB = f"{EXPRESSION_DIR}/*.parquet"
# manifest.json "outputs" entries: {"path", "kind", "size", "sha256", "rows"?, "n_files"?}
OUTPUT_KINDS = ("expression", "genes", "slides", "zarr", "card", "paired", "figure")

# AnnData keys inside zarr/<slide_id>.zarr (squidpy conventions, so squidpy/scanpy read them as is)
OBSM_SPATIAL = "spatial"  # (x, y) = (pxl_col, pxl_row) full-resolution pixels
OBSP_CONNECTIVITIES = "spatial_connectivities"
OBSP_DISTANCES = "spatial_distances"  # micrometres
UNS_NEIGHBORS = "spatial_neighbors"
UNS_SPATIAL = "spatial"  # {slide_id: {"scalefactors": {...}, "images": {...}, "metadata": {...}}}
UNS_SPAVIS = "spavis"  # provenance written by read_slice and build-shards
OBSM_EMBEDDING_PREFIX = "X_"  # obsm keys users and `stamp embed --zarr` add later (X_stamp, ...)
ZARR_CONSOLIDATED = ".zmetadata"

# Visium geometry: Space Ranger's spot_diameter_fullres spans a 65 µm disc (the 55 µm capture
# spot plus margin); spot centres are 100 µm apart. um_per_px = 65 / spot_diameter_fullres.
SPACERANGER_SPOT_DIAMETER_UM = 65.0
SPOT_SPACING_UM = 100.0
UM_PER_PX_METHODS = ("scalefactors", "lattice", "spot-spacing")  # slides.parquet um_per_px_method
# slides.parquet ``condition`` takes one of CONDITIONS (defined in the standard-library-only
# spavis.format.vocabulary, so fetch reads it without loading pyarrow)
from spavis.format.vocabulary import CONDITIONS  # noqa: E402,F401
# float32 holds every integer up to 2**24 exactly; larger counts are flagged (counts_exceed_float32)
FLOAT32_EXACT_MAX = 2**24


def zarr_build_file(rel: str) -> bool:
    """True for the Zarr files a build writes and manifest.json digests.

    Left out: ``.zmetadata`` (rewritten whenever a user adds something) and ``obsm/X_*``
    (embeddings added later, e.g. by ``stamp embed --zarr``).
    """
    return rel != ZARR_CONSOLIDATED and not rel.startswith(f"obsm/{OBSM_EMBEDDING_PREFIX}")

# Fixed row groups keep files identical between runs and small enough to stream.
ROW_GROUP_SIZE = 1024
PARQUET_WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": True,
    "write_statistics": True,
    "version": "2.6",
    "data_page_version": "1.0",
    "store_schema": True,
}

# Expression files: gene indices delta-encoded (sorted within each spot), counts byte-stream-
# split. On a 7,759-spot shard of generated slides (benchmarks/parquet_encodings.py, CPU s):
# 25.9 vs 41.7 MB, encode 0.87 vs 1.55 s, read 0.44 vs 0.57 s against plain encodings.
EXPRESSION_COLUMN_ENCODING: dict[str, str] = {
    "gene_index.list.element": "DELTA_BINARY_PACKED",
    "counts.list.element": "BYTE_STREAM_SPLIT",
}
# zstd level of expression files (the other files keep PARQUET_WRITE_OPTIONS' 3): on the same shard
# with these encodings, level 1 encoded in 0.67 s vs 0.73 s and read in 0.37 vs 0.42 s for a 2 %
# larger file (26.4 vs 25.9 MB), and the encoding is most of a corpus build's Parquet time.
EXPRESSION_COMPRESSION_LEVEL = 1

EXPRESSION_SCHEMA = pa.schema(
    [
        pa.field("spot_id", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("barcode", pa.string(), nullable=False),
        pa.field("spot_index", pa.int32(), nullable=False),
        pa.field("gene_index", pa.list_(pa.int32()), nullable=False),
        pa.field("counts", pa.list_(pa.float32()), nullable=False),
        pa.field("total_counts", pa.float32(), nullable=False),
        pa.field("n_genes", pa.int32(), nullable=False),
        pa.field("array_row", pa.int32()),
        pa.field("array_col", pa.int32()),
        pa.field("pxl_row", pa.float64()),
        pa.field("pxl_col", pa.float64()),
        pa.field("neighbors", pa.list_(pa.int32()), nullable=False),
        pa.field("neighbor_distances", pa.list_(pa.float32()), nullable=False),
    ]
)

GENES_SCHEMA = pa.schema(
    [
        pa.field("gene_index", pa.int32(), nullable=False),
        pa.field("ensembl_id", pa.string(), nullable=False),
        pa.field("symbol", pa.string()),
        pa.field("nnz", pa.int64(), nullable=False),
        pa.field("nonzero_sum_raw", pa.float64(), nullable=False),
        pa.field("nonzero_mean_raw", pa.float64()),
        pa.field("nonzero_sum_cp10k", pa.float64(), nullable=False),
        pa.field("nonzero_mean_cp10k", pa.float64()),
        pa.field("n_slides_detected", pa.int32(), nullable=False),
    ]
)

MAPPING_COLUMNS = (
    "mapping_n_features",
    "mapping_by_id",
    "mapping_by_symbol",
    "mapping_by_previous",
    "mapping_by_alias",
    "mapping_ambiguous",
    "mapping_unknown",
    "mapping_not_in_vocab",
    "mapping_in_vocab",
)

SLIDES_SCHEMA = pa.schema(
    [
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("accession", pa.list_(pa.string())),
        pa.field("organ", pa.string()),
        pa.field("species", pa.string()),
        pa.field("condition", pa.string()),
        pa.field("technology", pa.string()),
        pa.field("n_spots_input", pa.int64()),
        pa.field("n_spots_in_tissue", pa.int64()),
        pa.field("n_spots_kept", pa.int64()),
        pa.field("has_coordinates", pa.bool_()),
        pa.field("neighbor_method", pa.string()),
        pa.field("counts_are_integer", pa.bool_()),
        pa.field("um_per_px", pa.float64()),
        pa.field("um_per_px_method", pa.string()),
        pa.field("max_count", pa.float64()),
        pa.field("counts_exceed_float32", pa.bool_()),
        pa.field("warnings", pa.list_(pa.string())),
        *[pa.field(name, pa.int64()) for name in MAPPING_COLUMNS],
        pa.field("license", pa.string()),
        pa.field("citation", pa.string()),
        pa.field("input_sha256", pa.string()),
        pa.field("expression_file", pa.string()),
        pa.field("row_offset", pa.int64()),
        # paired images (build-shards --with-images); null for slides without an image
        pa.field("image_file", pa.string()),
        pa.field("image_kind", pa.string()),
        pa.field("image_um_per_px", pa.float64()),
        pa.field("n_patches_upsampled", pa.int64()),
        pa.field("n_patches_padded", pa.int64()),
    ]
)



# ---------------------------------------------------------------- paired images (issue 7)
# A patch is PATCH_PX x PATCH_PX pixels at PATCH_UM / PATCH_PX µm per pixel (0.5 µm/px), centred
# on the spot; its region is REGION_SCALE times wider (336 µm), resized to PATCH_PX, and holds
# the patch in one cell of a REGION_GRID x REGION_GRID grid (cell = row * 3 + col).
PATCH_PX = 224
PATCH_UM = 112.0
REGION_SCALE = 3
REGION_GRID = 3
UPSAMPLE_FLAG = 2.0  # a patch whose source pixels are magnified more than this is flagged upsampled
REGION_CELL_SALT = "spavis-region-cell-v1"  # the seeded hash of spot_id that draws the cell
PAIRED_DIR = "data/paired"  # part-NNNNN.parquet: same number and spot order as the expression part
PAIRED_ROW_GROUP_SIZE = 64  # ~20 MB of PNG per row group: small enough to stream
IMAGES_GROUP = "images"  # in each slide's Zarr store: patch, region, region_cell, upsampled, padded
ZARR_IMAGE_CHUNK = 64

IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])  # HF Image feature
PAIRED_FEATURES = {  # HF `datasets` features: `patch`/`region` load as PIL images
    "spot_id": {"dtype": "string", "_type": "Value"},
    "slide_id": {"dtype": "string", "_type": "Value"},
    "patch": {"_type": "Image"},
    "region": {"_type": "Image"},
    "region_cell": {"dtype": "int8", "_type": "Value"},
    "um_per_px": {"dtype": "float32", "_type": "Value"},
    "upsampled": {"dtype": "bool", "_type": "Value"},
    "padded": {"dtype": "bool", "_type": "Value"},
}
# nullable fields: datasets matches its Image features to Arrow fields including nullability
PAIRED_SCHEMA = pa.schema(
    [
        pa.field("spot_id", pa.string()),
        pa.field("slide_id", pa.string()),
        pa.field("patch", IMAGE_TYPE),
        pa.field("region", IMAGE_TYPE),
        pa.field("region_cell", pa.int8()),
        pa.field("um_per_px", pa.float32()),
        pa.field("upsampled", pa.bool_()),
        pa.field("padded", pa.bool_()),
    ],
    metadata={"huggingface": __import__("json").dumps({"info": {"features": PAIRED_FEATURES}}, sort_keys=True)},
)
