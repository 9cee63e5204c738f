"""The shard format: Arrow schemas, Parquet writer settings and layout names (a user contract)."""
from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

FORMAT_NAME = "spavis-shards"
FORMAT_VERSION = 1

EXPRESSION_DIR = "data/expression"
GENES_FILE = "genes.parquet"
SLIDES_FILE = "slides.parquet"
ZARR_DIR = "zarr"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"

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
        *[pa.field(name, pa.int64()) for name in MAPPING_COLUMNS],
        pa.field("license", pa.string()),
        pa.field("citation", pa.string()),
        pa.field("input_sha256", pa.string()),
        pa.field("expression_file", pa.string()),
        pa.field("row_offset", pa.int64()),
    ]
)


def json_dumps(obj: Any) -> str:
    """Canonical JSON (sorted keys, stable floats) so metadata files are byte-stable."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
