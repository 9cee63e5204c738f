"""Build the versioned slice manifests in manifests/ from the real public source tables.

    python manifests/build_manifests.py [--src ../shared/data/manifests] [--out manifests] [--check]

Inputs (real tables, see docs/sources_datacard.md for their licenses):
  hest_v1_1_0_metadata.csv               HEST-1k v1.1.0 metadata (CC BY-NC-SA 4.0)
  stimage1k4m_meta_all_gene02122025.csv  STimage-1K4M slide metadata (MIT)
  geo_slides_from_stimage1k4m.csv        GSE/GSM pairs derived from STimage-1K4M (MIT)
  tenx_public_visium_datasets.csv        10x public Visium datasets (MIT, st-visium-datasets 0.3.0)

Outputs: hest-v1.csv, stimage-v1.csv, geo-v1.csv, tenx-v1.csv and schema.json. Output is
deterministic (rows sorted by slide_id), so ``--check`` can tell whether the committed files
are current. Filters: human (Homo sapiens) and spot-based Visium only (Visium HD and the
older 'ST' arrays are excluded: different geometry, not read as Visium spots).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spavis.manifests import ROW_SCHEMA, ManifestRow, validate_manifest, write_manifest  # noqa: E402

VERSION = "v1"
HEST_CITATION = ("Jaume G. et al. HEST-1k: A Dataset for Spatial Transcriptomics and Histology Image "
                 "Analysis. NeurIPS 2024 Datasets and Benchmarks.")
STIMAGE_CITATION = ("Chen J. et al. STimage-1K4M: A histopathology image-gene expression dataset for "
                    "spatial transcriptomics. NeurIPS 2024 Datasets and Benchmarks.")
GEO_LICENSE = "GEO public data, see original publication"  # same wording as spavis.sources.geo
STIMAGE_LICENSE = "MIT (STimage-1K4M)"
TENX_LICENSE = "CC BY 4.0 (10x Genomics)"
HEST_NO_LICENSE = "unspecified by the submitter; distributed in HEST-1k under CC BY-NC-SA 4.0"

# Harmonized organ names (HEST's vocabulary, lower-case). Unlisted labels pass through lower-cased.
ORGAN_MAP = {
    "glioma": "brain", "glioblastoma": "brain", "cerebellum": "brain", "brain-cerebellum": "brain",
    "colon": "bowel", "colorectal": "bowel", "largeintestine": "bowel", "large-intestine": "bowel",
    "lymphnode": "lymph node", "lymph-node": "lymph node", "endometrium": "uterus",
    "spinal-cord": "spinal cord", "undifferentiated pleomorphic sarcoma": "soft tissue",
    "leiomyosarcoma": "soft tissue",
}
CONDITION_MAP = {"cancer": "cancer", "tumor": "cancer", "diseased": "diseased", "healthy": "healthy",
                 "treated": "treated"}


def organ_of(label: str) -> str:
    key = str(label).strip().lower()
    return ORGAN_MAP.get(key, key) or "unknown"


def _clean(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _extra(**fields) -> dict:
    out = {}
    for k, v in fields.items():
        if isinstance(v, float) and math.isnan(v):
            continue
        if hasattr(v, "item"):  # numpy scalar -> python
            v = v.item()
        if isinstance(v, str):
            v = v.strip()
            if not v:
                continue
        if v is None:
            continue
        out[k] = v
    return out


def build_hest(src: Path) -> list[ManifestRow]:
    df = pd.read_csv(src / "hest_v1_1_0_metadata.csv", encoding="utf-8-sig")
    df = df[(df.st_technology == "Visium") & (df.species == "Homo sapiens")]
    rows = []
    for r in df.itertuples(index=False):
        sid = str(r.id).strip()
        title, link = _clean(r.dataset_title), _clean(r.study_link)
        rows.append(ManifestRow(
            slide_id=sid, source="hest", accession=[sid], organ=organ_of(r.organ),
            species="Homo sapiens",
            condition=CONDITION_MAP.get(str(r.disease_state).strip().lower(), "unknown"),
            technology="Visium", license=_clean(r.license) or HEST_NO_LICENSE,
            citation="; ".join(x for x in (title, link) if x) + f" (via {HEST_CITATION})",
            expected_files=[f"st/{sid}.h5ad", f"metadata/{sid}.json"],
            extra=_extra(image_files=[f"wsis/{sid}.tif"], disease_state=r.disease_state, tissue=r.tissue,
                         oncotree_code=r.oncotree_code, preservation_method=r.preservation_method,
                         spots_under_tissue=r.spots_under_tissue, nb_genes=r.nb_genes,
                         spot_diameter=r.spot_diameter, inter_spot_dist=r.inter_spot_dist,
                         pixel_size_um_estimated=r.pixel_size_um_estimated, magnification=r.magnification,
                         patient=r.patient, subseries=r.subseries, download_page=r.download_page_link1,
                         hest_version_added=r.hest_version_added),
        ))
    return sorted(rows, key=lambda x: x.slide_id)


def _pmid_citation(pmid) -> str:
    pmids = [p.strip() for p in str(pmid).split(",") if p.strip() and p.strip().lower() != "nan"]
    return "; ".join(f"PMID:{p}" for p in pmids)


def build_stimage(src: Path) -> list[ManifestRow]:
    df = pd.read_csv(src / "stimage1k4m_meta_all_gene02122025.csv")
    df = df[(df.tech == "Visium") & (df.species == "human")]
    rows = []
    for r in df.itertuples(index=False):
        sid = str(r.slide).strip()
        accession = [a for a in sid.split("_") if a[:3] in ("GSE", "GSM")] or [sid]
        cite = _pmid_citation(r.pmid)
        rows.append(ManifestRow(
            slide_id=sid, source="stimage", accession=accession, organ=organ_of(r.tissue),
            condition="cancer" if str(r.involve_cancer) == "True" else "unknown", technology="Visium",
            license=STIMAGE_LICENSE, citation=(cite + f" (via {STIMAGE_CITATION})").strip(),
            expected_files=[f"Visium/gene_exp/{sid}_count.csv", f"Visium/coord/{sid}_coord.csv"],
            extra=_extra(image_files=[f"Visium/image/{sid}.png"], tissue=r.tissue, spot_num=r.spot_num,
                         gene_num=r.gene_num, pmid=str(r.pmid)),
        ))
    return sorted(rows, key=lambda x: x.slide_id)


def build_geo(src: Path) -> list[ManifestRow]:
    df = pd.read_csv(src / "geo_slides_from_stimage1k4m.csv")
    df = df[(df.tech == "Visium") & (df.species == "human")]
    rows = []
    for r in df.itertuples(index=False):
        rows.append(ManifestRow(
            slide_id=str(r.gsm).strip(), source="geo", accession=[str(r.gse).strip(), str(r.gsm).strip()],
            organ=organ_of(r.tissue), condition="cancer" if str(r.involve_cancer) == "True" else "unknown",
            technology="Visium", license=GEO_LICENSE, citation=_pmid_citation(r.pmid),
            expected_files=[],  # resolved from the series SOFT at fetch time
            extra=_extra(stimage_slide=r.slide, tissue=r.tissue, spot_num=r.spot_num, gene_num=r.gene_num),
        ))
    return sorted(rows, key=lambda x: x.slide_id)


def _tenx_condition(label: str) -> str:
    label = str(label).lower()
    if label == "healthy":
        return "healthy"
    if any(k in label for k in ("cancer", "carcinoma", "melanoma", "glioblastoma")):
        return "cancer"
    return "unknown"


def build_tenx(src: Path) -> list[ManifestRow]:
    df = pd.read_csv(src / "tenx_public_visium_datasets.csv")
    df = df[df.species == "human"]
    rows = []
    for r in df.itertuples(index=False):
        urls = {u.rsplit("/", 1)[-1]: u for u in (r.feature_barcode_matrix_hdf5_filtered, r.spatial_imaging_data)}
        image = str(r.image_tiff)
        rows.append(ManifestRow(
            slide_id=str(r.name).strip(), source="tenx", accession=[str(r.sample_id).strip()],
            organ=organ_of(r.anatomical_entity), condition=_tenx_condition(r.disease_state),
            technology="Visium", license=TENX_LICENSE, citation=f"{r.title}. 10x Genomics, {r.homepage}",
            expected_files=sorted(urls),
            # the shared table publishes no md5/size: checksums stay empty, fetch records sha256
            extra=_extra(urls=urls, image_files=[image.rsplit("/", 1)[-1]], image_urls=[image],
                         disease_state=r.disease_state, anatomical_entity=r.anatomical_entity,
                         preservation_method=r.preservation_method,
                         spots_under_tissue=r.number_of_spots_under_tissue, published_at=r.published_at),
        ))
    return sorted(rows, key=lambda x: x.slide_id)


BUILDERS = {
    "hest": (build_hest, "HEST-1k v1.1.0 metadata (hest_v1_1_0_metadata.csv, CC BY-NC-SA 4.0): "
                         "st_technology == Visium, species == Homo sapiens"),
    "stimage": (build_stimage, "STimage-1K4M metadata (stimage1k4m_meta_all_gene02122025.csv, MIT): "
                               "tech == Visium, species == human"),
    "geo": (build_geo, "GEO slides derived from STimage-1K4M (geo_slides_from_stimage1k4m.csv, MIT): "
                       "tech == Visium, species == human"),
    "tenx": (build_tenx, "10x public Visium datasets (tenx_public_visium_datasets.csv from st-visium-datasets "
                         "0.3.0, MIT): species == human"),
}


def build_all(src: Path, out: Path) -> dict[str, Path]:
    """Write every manifest + schema.json into ``out``; returns {source: path}."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for source, (builder, origin) in BUILDERS.items():
        rows = builder(src)
        comment = [f"SpaVis manifest {source}-{VERSION}: {len(rows)} slices.",
                   f"Built by manifests/build_manifests.py from {origin}.",
                   "Columns: see manifests/schema.json (lists ';'-separated, extra = JSON)."]
        written[source] = write_manifest(rows, out / f"{source}-{VERSION}.csv", header_comment=comment)
    schema_tmp = out / ".schema.json.tmp"
    schema_tmp.write_text(json.dumps(ROW_SCHEMA, indent=2) + "\n", encoding="utf-8")
    schema_tmp.replace(out / "schema.json")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=ROOT.parent / "shared" / "data" / "manifests")
    parser.add_argument("--out", type=Path, default=ROOT / "manifests")
    parser.add_argument("--check", action="store_true", help="fail if the files in --out are not current")
    args = parser.parse_args(argv)
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            fresh = build_all(args.src, Path(tmp))
            stale = [p.name for p in [*fresh.values(), Path(tmp) / "schema.json"]
                     if not (args.out / p.name).is_file()
                     or (args.out / p.name).read_bytes() != p.read_bytes()]
        if stale:
            print(f"out of date: {', '.join(stale)}; run python manifests/build_manifests.py", file=sys.stderr)
            return 1
        print("manifests are current")
        return 0
    for source, path in build_all(args.src, args.out).items():
        problems = validate_manifest(path)
        if problems:
            print(f"{path}: {problems[:5]}", file=sys.stderr)
            return 1
        print(f"{source}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
