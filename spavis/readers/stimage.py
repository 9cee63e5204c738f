"""STimage-1K4M slides: `gene_exp/<slide>_count.csv` (dense spots x genes, spot id in the
first column), `coord/<slide>_coord.csv` (columns: spot id, yaxis, xaxis, r — pixel centre
and spot radius in the slide image) and `image/<slide>.png` (the full image: never decoded).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from spavis.errors import ReaderError
from spavis.readers._assemble import assemble
from spavis.readers.tenx import normalize_positions

_CHUNK = 2000  # spots per chunk: dense rows are made sparse chunk by chunk


def _slide_name(count_csv: Path) -> str:
    name = count_csv.name
    return name[: name.lower().rfind("_count.csv")]


def _sibling(count_csv: Path, slide: str, suffix: str, folder: str) -> Path | None:
    for d in (count_csv.parent, count_csv.parent.parent / folder, count_csv.parent / folder):
        for ext in ("", ".gz"):
            p = d / f"{slide}{suffix}{ext}"
            if p.is_file():
                return p
    return None


def _strip(ids: pd.Index, slide: str) -> np.ndarray:
    pre = f"{slide}_"
    return np.array([s[len(pre):] if s.startswith(pre) else s for s in ids.astype(str)], dtype=object)


def read_stimage(count_csv: Path, root: Path | None = None) -> "object":
    slide = _slide_name(count_csv)
    blocks, index, columns = [], [], None
    try:
        for chunk in pd.read_csv(count_csv, index_col=0, chunksize=_CHUNK):
            columns = chunk.columns if columns is None else columns
            vals = chunk.to_numpy(dtype=np.float32, na_value=np.nan)
            blocks.append(sp.csr_matrix(vals))
            index.append(chunk.index.astype(str))
    except (OSError, EOFError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ReaderError(f"{count_csv}: cannot read the STimage-1K4M count table ({exc}); it is corrupt.") from exc
    if columns is None:
        raise ReaderError(f"{count_csv}: the count table is empty; download the slide again.")
    X = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(columns)), dtype=np.float32)
    barcodes = _strip(pd.Index(np.concatenate(index)) if index else pd.Index([]), slide)

    coord = _sibling(count_csv, slide, "_coord.csv", "coord")
    positions, spot_diam = None, None
    if coord is not None:
        try:
            c = pd.read_csv(coord, index_col=0)
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            raise ReaderError(f"{coord}: cannot read spot coordinates ({exc}); it is corrupt.") from exc
        missing = {"xaxis", "yaxis"} - set(c.columns)
        if missing:
            raise ReaderError(f"{coord}: missing column(s) {sorted(missing)}; expected ',yaxis,xaxis,r'.")
        df = pd.DataFrame({"barcode": _strip(c.index, slide), "pxl_row": c["yaxis"].to_numpy(), "pxl_col": c["xaxis"].to_numpy()})
        positions = normalize_positions(df, coord)
        if "r" in c.columns and len(c):
            spot_diam = float(2.0 * np.nanmedian(c["r"].to_numpy(np.float64)))
    image = _sibling(count_csv, slide, ".png", "image")
    return assemble(
        X, barcodes, np.asarray(columns, dtype=str),
        positions=positions, reader="stimage1k4m", source_path=root or count_csv,
        matrix_file=count_csv, positions_file=coord, spot_diameter_fullres=spot_diam,
        extra_uns={"image_path": str(image) if image else "", "stimage_slide": slide},
    )
