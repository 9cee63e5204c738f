"""Paired (expression + image) corpora from GENERATED slices for the stamp alignment tests.

``make_paired_corpus`` builds a small shard corpus with :func:`stamp_helpers.make_corpus`
(spatial domains drive expression) and writes ``data/paired/part-N.parquet`` beside each
expression part in the shard format of ``spavis.format.schema`` (same spot order; HF Image
structs holding PNG bytes), whose patches carry a texture driven by the SAME domains:
a domain colour + stripe orientation/frequency, a per-spot brightness jitter and noise.
The region is a 3 x 3 mosaic: the spot's own patch (shrunk) in its ``region_cell``, patches
of random domains elsewhere. Everything is generated data, labelled as such.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from stamp_helpers import generated_domains, make_corpus, write_generated_slices

PX = 224


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def domain_texture(domain: int, rng: np.random.Generator, size: int = PX, n_domains: int = 4) -> np.ndarray:
    """An H&E-like tile whose colour and stripes depend on ``domain`` (+ spot jitter and noise).

    Drawn on a 56 px lattice and scaled up (nearest), so the PNGs stay small and fast to write.
    """
    hues = np.array([[200, 90, 150], [120, 60, 170], [230, 170, 200], [150, 40, 90], [90, 140, 200], [210, 120, 90]])
    base = hues[domain % len(hues)].astype(np.float32) * rng.uniform(0.85, 1.15)
    coarse = 56
    angle = np.pi * domain / n_domains
    freq = 2 * np.pi * (2 + domain) / coarse
    yy, xx = np.mgrid[0:coarse, 0:coarse].astype(np.float32)
    wave = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
    img = base[None, None, :] * (0.75 + 0.25 * wave[..., None])
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(img).resize((size, size), Image.NEAREST))


def region_mosaic(patch: np.ndarray, cell: int, domain_of_others, rng: np.random.Generator,
                  n_domains: int = 4) -> np.ndarray:
    """A 224 px region: 3 x 3 cells, ``patch`` (shrunk) in ``cell``, other domains' textures elsewhere."""
    edges = np.round(np.linspace(0, PX, 4)).astype(int)
    out = np.zeros((PX, PX, 3), np.uint8)
    for c in range(9):
        r, k = divmod(c, 3)
        h, w = edges[r + 1] - edges[r], edges[k + 1] - edges[k]
        side = max(h, w)
        if c == cell:
            tile = np.asarray(Image.fromarray(patch).resize((side, side), Image.BILINEAR))
        else:
            tile = domain_texture(int(domain_of_others(rng)), rng, size=side, n_domains=n_domains)
        out[edges[r]:edges[r + 1], edges[k]:edges[k + 1]] = tile[:h, :w]
    return out


def write_paired(root: Path, domains: dict[str, int], *, seed: int = 0, n_domains: int = 4) -> list[Path]:
    """data/paired/part-N.parquet for every expression part of the corpus at ``root``."""
    from spavis.format import schema as S

    out_dir = Path(root) / S.PAIRED_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for part in sorted((Path(root) / S.EXPRESSION_DIR).glob("*.parquet")):
        table = pq.read_table(part, columns=["spot_id", "slide_id"])
        spots = table.column("spot_id").to_pylist()
        patches, regions, cells = [], [], []
        for sid in spots:
            rng = np.random.default_rng([seed] + list(sid.encode()))
            patch = domain_texture(int(domains[sid]), rng, n_domains=n_domains)
            cell = int(rng.integers(0, 9))
            region = region_mosaic(patch, cell, lambda g: g.integers(0, n_domains), rng, n_domains)
            patches.append({"bytes": _png(patch), "path": None})
            regions.append({"bytes": _png(region), "path": None})
            cells.append(cell)
        n = len(spots)
        data = {
            "spot_id": table.column("spot_id"), "slide_id": table.column("slide_id"),
            "patch": pa.array(patches, S.IMAGE_TYPE), "region": pa.array(regions, S.IMAGE_TYPE),
            "region_cell": pa.array(cells, pa.int8()), "um_per_px": pa.array(np.full(n, 0.5, np.float32)),
            "upsampled": pa.array(np.zeros(n, bool)), "padded": pa.array(np.zeros(n, bool)),
        }
        path = out_dir / part.name
        pq.write_table(pa.table(data), path)
        written.append(path)
    _list_in_manifest(Path(root), written)
    return written


def _list_in_manifest(root: Path, files: list[Path]) -> None:
    """Record the paired parts in manifest.json as build-shards --with-images does (kind 'paired')."""
    import hashlib
    import json

    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    outputs = [o for o in manifest.get("outputs", []) if o.get("kind") != "paired"]
    for f in files:
        outputs.append({"kind": "paired", "path": f.relative_to(root).as_posix(),
                        "rows": pq.ParquetFile(f).metadata.num_rows,
                        "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "size": f.stat().st_size})
    manifest["outputs"] = outputs
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def make_paired_corpus(root: Path, *, slides: int = 1, n_genes: int = 80, max_row: int = 6, n_domains: int = 4,
                       seed: int = 0, min_genes: int = 5, **simulate_kwargs) -> tuple[Path, dict[str, int]]:
    """A corpus built by the real pipeline from GENERATED slices with a generated H&E image:
    ``write_simulated_slice(..., he_image=True)`` (domains drive expression AND texture) then
    ``build_shards(..., with_images=True)``. Returns (root, {spot_id: domain number})."""
    from spavis.shards import build_shards

    root = Path(root)
    vocab, folders = write_generated_slices(root, slides=slides, n_genes=n_genes, seed=seed, n_domains=n_domains,
                                            max_row=max_row, he_image=True, **simulate_kwargs)
    build_shards(folders, root, vocab=vocab, min_genes=min_genes, k_neighbors=8, max_spots_per_shard=1,
                 with_images=True)
    return root, {k: int(str(d).rsplit("_", 1)[-1]) for k, d in generated_domains(folders).items()}


def make_mosaic_corpus(root: Path, *, slides: int = 2, n_genes: int = 80, max_row: int = 6, n_domains: int = 4,
                       seed: int = 0, **kwargs) -> tuple[Path, dict[str, int]]:
    """Like :func:`make_paired_corpus`, with the simple mosaic images of :func:`write_paired` (fast)."""
    corpus, domains = make_corpus(root, slides=slides, n_genes=n_genes, max_row=max_row, n_domains=n_domains,
                                  seed=seed, **kwargs)
    domains = {k: int(str(v).rsplit("_", 1)[-1]) for k, v in domains.items()}
    write_paired(corpus, domains, seed=seed, n_domains=n_domains)
    return corpus, domains
