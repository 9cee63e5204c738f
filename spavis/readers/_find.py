"""Find the files of one slice in a folder, whatever the naming: Space Ranger outs,
GEO flat folders with `GSMnnnn_` prefixes, gzip'd or not."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from spavis.errors import ReaderError
from spavis.spaceranger import FILES

# kind -> name endings (matched case-insensitively after dropping a trailing .gz), preferred first
_ENDINGS: dict[str, tuple[str, ...]] = {k: v for k, v in FILES.items() if k != "hires"}
_GSM_RE = re.compile(r"^(GSM\d+)")
_MAX_DEPTH = 3


@dataclass
class Found:
    kind: str
    path: Path
    prefix: str  # file name before the standard ending, e.g. "GSM8047880_sample_"
    rank: int  # position of the ending in _ENDINGS[kind] (lower = preferred)

    @property
    def sample_key(self) -> str:
        m = _GSM_RE.match(self.prefix)
        return m.group(1) if m else self.prefix


def classify(path: Path) -> Found | None:
    name = path.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    for kind, endings in _ENDINGS.items():
        for rank, ending in enumerate(endings):
            if base.endswith(ending):
                return Found(kind, path, path.name[: len(base) - len(ending)], rank)
    return None


def _walk(root: Path, depth: int = 0) -> list[Path]:
    out: list[Path] = []
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir() and depth < _MAX_DEPTH:
            out.extend(_walk(child, depth + 1))
        elif child.is_file():
            out.append(child)
    return out


@dataclass
class SliceFiles:
    root: Path
    h5: Path | None = None
    mtx: tuple[Path, Path, Path] | None = None  # matrix, barcodes, features
    positions: Path | None = None
    scalefactors: Path | None = None
    lowres: Path | None = None
    h5ad: list[Path] = field(default_factory=list)
    stimage_counts: list[Path] = field(default_factory=list)


def _pick(cands: list[Found], key: str | None, root: Path, kind: str) -> Found | None:
    """The candidate of the matrix's sample (or the only one); prefer Space Ranger's preferred names."""
    if not cands:
        return None
    same = [c for c in cands if key is None or c.sample_key == key]
    if not same:
        keys = {c.sample_key for c in cands}
        if len(keys) > 1:
            return None
        same = cands
    # filtered before raw (Space Ranger writes both), shallow before deep, then by name
    same.sort(key=lambda c: (c.rank, "raw" in c.path.parent.name.lower(), len(c.path.parts), str(c.path)))
    return same[0]


def find_slice_files(root: Path, only_prefix: str | None = None) -> SliceFiles:
    """Scan `root` (depth <= 3) for the files of exactly one slice."""
    files = _walk(root)
    found: dict[str, list[Found]] = {k: [] for k in _ENDINGS}
    out = SliceFiles(root=root)
    for p in files:
        low = p.name.lower()
        if low.endswith(".h5ad"):
            out.h5ad.append(p)
        elif low.endswith("_count.csv") or low.endswith("_count.csv.gz"):
            out.stimage_counts.append(p)
        elif (f := classify(p)) is not None:
            if only_prefix is None or f.sample_key == only_prefix:
                found[f.kind].append(f)
    matrices = found["h5"] + found["mtx"]
    keys = sorted({m.sample_key for m in matrices})
    if len(keys) > 1:
        raise ReaderError(
            f"{root}: holds the matrices of {len(keys)} samples ({', '.join(keys[:5])}"
            f"{', ...' if len(keys) > 5 else ''}). Pass one sample at a time: its matrix file "
            "(its spatial files are found next to it by their GSM prefix) or a folder per sample."
        )
    key = keys[0] if keys else None
    h5 = _pick([f for f in found["h5"]], key, root, "h5")
    if h5 is not None and h5.rank < 2:
        out.h5 = h5.path
    mtx = _pick(found["mtx"], key, root, "mtx")
    if out.h5 is None and mtx is not None:
        same_dir = lambda fs: [f for f in fs if f.path.parent == mtx.path.parent and f.prefix == mtx.prefix]  # noqa: E731
        bc, ft = same_dir(found["barcodes"]), same_dir(found["features"])
        if not bc or not ft:
            missing = "barcodes.tsv(.gz)" if not bc else "features.tsv(.gz) / genes.tsv(.gz)"
            raise ReaderError(
                f"{mtx.path}: no {mtx.prefix}{missing} next to the matrix; copy it from the same sample."
            )
        out.mtx = (mtx.path, bc[0].path, sorted(ft, key=lambda f: f.rank)[0].path)
    if out.h5 is None and out.mtx is None and h5 is not None:  # only a raw matrix: in_tissue filters it
        out.h5 = h5.path
    for kind in ("positions", "scalefactors", "lowres"):
        pick = _pick(found[kind], key, root, kind)
        setattr(out, kind, pick.path if pick else None)
    return out
