"""Recognise a Visium file set among a sample's files, loose or packed in archives.

GEO submitters upload Space Ranger outputs in three shapes, all recognised here by name:
loose gzip'd files with ``GSMnnnn_`` prefixes, the same inside ``GSEnnnn_RAW.tar``, and
packs such as ``GSMnnnn_*_filtered_feature_bc_matrix.tar.gz`` / ``GSMnnnn_*_spatial.tar.gz``
(or ``.tgz`` / ``.tar`` / ``.zip``). Packs are unpacked into the Space Ranger layout
(``filtered_feature_bc_matrix/…``, ``spatial/…``) that ``spavis.read_slice`` reads.
"""
from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Iterable

from spavis.errors import FetchError
from spavis import spaceranger as SR
from spavis.spaceranger import ending_pattern

_PACK = r"\.(?:tar|tgz|zip)"  # after a trailing ".gz" is dropped: .tar.gz -> .tar
# Visium file roles, matched on the file name without ".gz" (GEO adds GSM/sample prefixes).
ROLES: dict[str, str] = {  # file names from the one Space Ranger table (spavis.spaceranger)
    "h5": ending_pattern([SR.MATRIX_H5]),
    "h5_raw": ending_pattern([SR.RAW_MATRIX_H5]),
    "barcodes": ending_pattern(SR.FILES["barcodes"]),
    "features": ending_pattern(SR.FILES["features"]),
    "matrix": ending_pattern(SR.FILES["mtx"]),
    "positions": ending_pattern(SR.FILES["positions"]),
    "scalefactors": ending_pattern(SR.FILES["scalefactors"]),
    "lowres": ending_pattern([SR.LOWRES_IMAGE]),
    "hires": ending_pattern(SR.FILES["hires"]),
    "mtx_pack": r"filtered_(?:feature_bc_matrix|gene_bc_matrices)" + _PACK,
    "raw_mtx_pack": r"raw_(?:feature_bc_matrix|gene_bc_matrices)" + _PACK,
    "spatial_pack": r"spatial" + _PACK,
}
_ROLE_RE = {role: re.compile(r"(?:^|[_.\-/])" + pat + r"$", re.I) for role, pat in ROLES.items()}

# pack role -> (folder inside the slice, roles taken from the pack)
PACKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "spatial_pack": (SR.SPATIAL_DIR, ("positions", "scalefactors", "lowres", "hires")),
    "mtx_pack": (SR.MATRIX_DIR, ("barcodes", "features", "matrix")),
    "raw_mtx_pack": (SR.RAW_MATRIX_DIR, ("barcodes", "features", "matrix")),
}
MATRIX_ROLES = ("h5", "matrix", "h5_raw")


def role_of(name: str) -> str | None:
    base = name.rsplit("/", 1)[-1]
    if base.lower().endswith(".gz"):
        base = base[:-3]
    for role, rx in _ROLE_RE.items():
        if rx.search(base):
            return role
    return None


def visium_set(names: Iterable[str], *, with_images: bool = False) -> dict[str, str] | None:
    """Pick one Visium file set (role -> name) from a sample's files, or None if incomplete.

    Needs tissue positions (loose, else a spatial pack) plus a matrix: filtered h5, else a
    barcodes/features/matrix.mtx triplet, else a filtered matrix pack, else a raw h5 or raw
    pack. Loose scalefactors and lowres image come along when present; the hires image
    only with ``with_images``.
    """
    by_role: dict[str, list[str]] = {}
    for n in sorted(set(names)):
        r = role_of(n)
        if r:
            by_role.setdefault(r, []).append(n)

    def best(role: str) -> str:
        cands = by_role[role]
        plain = [c for c in cands if "raw_feature" not in c.lower()]
        return (plain or cands)[0]

    picked: dict[str, str] = {}
    spatial = "positions" if by_role.get("positions") else "spatial_pack" if by_role.get("spatial_pack") else None
    if spatial is None:
        return None
    picked[spatial] = best(spatial)
    if by_role.get("h5"):
        picked["h5"] = best("h5")
    elif all(by_role.get(r) for r in ("barcodes", "features", "matrix")):
        for r in ("barcodes", "features", "matrix"):
            picked[r] = best(r)
    else:
        role = next((r for r in ("mtx_pack", "h5_raw", "raw_mtx_pack") if by_role.get(r)), None)
        if role is None:
            return None
        picked[role] = best(role)
    for r in ("scalefactors", "lowres") + (("hires",) if with_images else ()):
        if by_role.get(r):
            picked[r] = best(r)
    return picked


def pack_targets(pack_role: str, members: Iterable[str], *, with_images: bool = False) -> dict[str, str]:
    """member -> path inside the slice for the files of a pack that a reader needs.

    One member per role (the shallowest, then alphabetical); macOS/hidden entries ignored.
    """
    folder, roles = PACKS[pack_role]
    wanted = [r for r in roles if with_images or r != "hires"]
    chosen: dict[str, str] = {}
    for m in sorted(members, key=lambda n: (n.count("/"), n)):
        parts = PurePosixPath(m).parts
        if any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue
        r = role_of(m)
        if r in wanted and r not in chosen:
            chosen[r] = m
    return {m: f"{folder}/{PurePosixPath(m).name}" for m in chosen.values()}


def check_complete(names: Iterable[str], label: str, origin: str) -> None:
    """Refuse a slice whose (unpacked) files lack tissue positions or a count matrix."""
    roles = {role_of(n) for n in names}
    missing = [what for what, ok in (("tissue positions", "positions" in roles),
                                      ("a count matrix", any(r in roles for r in MATRIX_ROLES))) if not ok]
    if missing:
        raise FetchError(f"{label}: {origin} holds no {' and no '.join(missing)}; this is not a "
                         "Space Ranger Visium output spavis can read.")
