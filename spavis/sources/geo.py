"""GEO: human Visium samples (GSM) from the NCBI GEO file tree.

Protocol (the real one; base URL from ``SPAVIS_GEO_URL``, default
``https://ftp.ncbi.nlm.nih.gov/geo``):

* series metadata: ``<base>/series/GSE146nnn/GSE146540/soft/GSE146540_family.soft.gz``,
  downloaded by our downloader and parsed locally with GEOparse (GEOparse never downloads);
* a ``--id GSM…`` is resolved to its series through the sample's SOFT text from GEO's
  query endpoint ``acc.cgi?acc=GSM…&targ=self&form=text&view=brief`` (the FTP tree has no
  per-sample SOFT). Its URL comes from ``SPAVIS_GEO_QUERY_URL``; when only SPAVIS_GEO_URL
  is set (tests, mirrors) it is ``<SPAVIS_GEO_URL>/query/acc.cgi``;
* supplementary files, listed in SOFT as ``ftp://ftp.ncbi.nlm.nih.gov/geo/...``, are mapped
  onto the base URL. A sample whose own files form a Visium set is fetched file by file;
  otherwise the series ``GSEnnnn_RAW.tar`` is downloaded once into
  ``CACHE/geo/.series/<GSE>/`` and only that sample's ``GSMnnnn_*`` members are extracted
  (safely). Files keep their GEO names (``GSMnnnn_…``, gzip'd); ``read_slice`` reads them.
"""
from __future__ import annotations

import gzip
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from spavis.errors import FetchError
from spavis.sources import archive, download, sidecar

log = logging.getLogger(__name__)

DEFAULT_BASE = "https://ftp.ncbi.nlm.nih.gov/geo"
DEFAULT_QUERY = "https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi"
LICENSE = "GEO public data, see original publication"
HUMAN = "Homo sapiens"

# Visium file roles, matched on the file name without ".gz" (GEO adds GSM/sample prefixes).
ROLES: dict[str, str] = {
    "h5": r"filtered_feature_bc_matrix\.h5",
    "h5_raw": r"raw_feature_bc_matrix\.h5",
    "barcodes": r"barcodes\.tsv",
    "features": r"(?:features|genes)\.tsv",
    "matrix": r"matrix\.mtx",
    "positions": r"tissue_positions(?:_list)?\.(?:csv|parquet)",
    "scalefactors": r"scalefactors_json\.json",
    "lowres": r"tissue_lowres_image\.png",
    "hires": r"tissue_hires_image\.png",
}
_ROLE_RE = {role: re.compile(r"(?:^|[_.\-/])" + pat + r"$", re.I) for role, pat in ROLES.items()}

_CANCER = ("cancer", "carcinoma", "tumor", "tumour", "adenocarcinoma", "melanoma", "glioblastoma",
           "glioma", "lymphoma", "leukemia", "leukaemia", "sarcoma", "neoplasm", "metasta",
           "malignan", "blastoma", "myeloma", "dcis", "idc")
_TREATED = ("treated", "treatment", "therapy", "chemo", "radiation", "irradiat", "drug", "inhibitor",
            "stimulat", "vaccin")
_DISEASED = ("disease", "fibrosis", "fibrotic", "infarct", "covid", "sars-cov", "alzheimer", "inflam",
             "lesion", "injur", "psoriasis", "diabet", "dermatitis", "colitis", "crohn", "arthritis",
             "patient", "failure", "cirrhosis", "sclerosis", "infect", "syndrome", "dystrophy")
_HEALTHY = ("healthy", "normal", "control", "non-diseased", "nondiseased", "donor", "unaffected")
_ORGAN_KEYS = ("tissue", "organ", "tissue type", "organism part", "anatomical site",
               "tissue/organ", "source tissue", "body site", "tissue source")


# ---- URLs ---------------------------------------------------------------------------

def base_url() -> str:
    return os.environ.get("SPAVIS_GEO_URL", DEFAULT_BASE).rstrip("/")


def query_url() -> str:
    env = os.environ.get("SPAVIS_GEO_QUERY_URL")
    if env:
        return env
    if os.environ.get("SPAVIS_GEO_URL"):
        return base_url() + "/query/acc.cgi"
    return DEFAULT_QUERY


def stub(acc: str) -> str:
    """GEO range folder: GSE146540 -> GSE146nnn, GSM8047880 -> GSM8047nnn, GSE12 -> GSEnnn."""
    prefix, digits = acc[:3], acc[3:]
    return f"{prefix}{digits[:-3]}nnn"


def family_soft_url(gse: str) -> str:
    return f"{base_url()}/series/{stub(gse)}/{gse}/soft/{gse}_family.soft.gz"


def map_url(url: str) -> str:
    """Map a SOFT ``ftp://ftp.ncbi.nlm.nih.gov/geo/...`` URL onto the configured base URL."""
    m = re.match(r"^(?:ftp|https?)://ftp\.ncbi\.nlm\.nih\.gov/geo/(.*)$", url.strip())
    return f"{base_url()}/{m.group(1)}" if m else url.strip()


# ---- Visium file sets -----------------------------------------------------------------

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

    Needs positions plus a matrix: filtered h5, else a barcodes/features/matrix.mtx
    triplet (filtered preferred), else a raw h5. Scalefactors and the lowres image come
    along when present; the hires image only with ``with_images``.
    """
    by_role: dict[str, list[str]] = {}
    for n in sorted(set(names)):
        r = role_of(n)
        if r:
            by_role.setdefault(r, []).append(n)

    def best(role: str) -> str | None:
        cands = by_role.get(role, [])
        plain = [c for c in cands if "raw_feature" not in c.lower()]
        return (plain or cands or [None])[0]

    picked: dict[str, str] = {}
    if not by_role.get("positions"):
        return None
    picked["positions"] = best("positions")  # type: ignore[assignment]
    if by_role.get("h5"):
        picked["h5"] = best("h5")  # type: ignore[assignment]
    elif all(by_role.get(r) for r in ("barcodes", "features", "matrix")):
        for r in ("barcodes", "features", "matrix"):
            picked[r] = best(r)  # type: ignore[assignment]
    elif by_role.get("h5_raw"):
        picked["h5_raw"] = best("h5_raw")  # type: ignore[assignment]
    else:
        return None
    for r in ("scalefactors", "lowres") + (("hires",) if with_images else ()):
        if by_role.get(r):
            picked[r] = best(r)  # type: ignore[assignment]
    return picked


# ---- SOFT metadata ---------------------------------------------------------------------

@dataclass
class Sample:
    gsm: str
    title: str
    organism: str
    characteristics: dict[str, str]
    source_name: str
    supplementary: list[str]  # mapped URLs

    def text(self) -> str:
        return " ".join([self.title, self.source_name, *self.characteristics.values()]).lower()


@dataclass
class Series:
    gse: str
    title: str
    pubmed: list[str]
    supplementary: list[str]  # mapped URLs
    samples: dict[str, Sample] = field(default_factory=dict)
    soft_url: str = ""

    @property
    def raw_tar_url(self) -> str | None:
        return next((u for u in self.supplementary if u.endswith(f"{self.gse}_RAW.tar")), None)

    def citation(self) -> str:
        pm = f"; PubMed {self.pubmed[0]} https://pubmed.ncbi.nlm.nih.gov/{self.pubmed[0]}/" if self.pubmed else ""
        return f"{self.title} (GEO {self.gse}{pm})"


def _urls(values: Sequence[str]) -> list[str]:
    return [map_url(v) for v in values if v and v.strip().upper() != "NONE"]


def parse_family_soft(path: Path, gse: str) -> Series:
    """Parse a family SOFT file with GEOparse (local file only)."""
    import GEOparse

    logging.getLogger("GEOparse").setLevel(logging.WARNING)
    try:
        obj = GEOparse.get_GEO(filepath=str(path), silent=True)
    except Exception as exc:  # GEOparse raises plain exceptions on malformed text
        raise FetchError(f"{gse}: cannot parse {path} ({exc}); delete it and fetch again.") from None
    md = obj.metadata
    series = Series(
        gse=gse,
        title=(md.get("title") or [gse])[0],
        pubmed=list(md.get("pubmed_id") or []),
        supplementary=_urls(md.get("supplementary_file") or []),
    )
    for name, gsm in obj.gsms.items():
        g = gsm.metadata
        chars: dict[str, str] = {}
        for c in g.get("characteristics_ch1") or []:
            key, _, val = c.partition(":")
            if val:
                chars[key.strip().lower()] = val.strip()
            else:
                chars[f"_{len(chars)}"] = key.strip()
        supp = [v for k, vals in g.items() if k.startswith("supplementary_file") for v in vals]
        series.samples[name] = Sample(
            gsm=name,
            title=(g.get("title") or [""])[0],
            organism=", ".join(g.get("organism_ch1") or ["unknown"]),
            characteristics=chars,
            source_name=(g.get("source_name_ch1") or [""])[0],
            supplementary=_urls(supp),
        )
    return series


def guess_condition(text: str) -> str:
    """cancer / treated / diseased / healthy / unknown from free text (first hit wins)."""
    t = text.lower()
    for label, words in (("cancer", _CANCER), ("treated", _TREATED), ("diseased", _DISEASED),
                         ("healthy", _HEALTHY)):
        if any(re.search(r"\b" + re.escape(w), t) for w in words):
            return label
    return "unknown"


def guess_organ(sample: Sample) -> str | None:
    for key in _ORGAN_KEYS:
        if sample.characteristics.get(key):
            return sample.characteristics[key].strip().lower()
    return None


# ---- fetching ------------------------------------------------------------------------

def _series_dir(cache: Path, gse: str) -> Path:
    return cache / "geo" / ".series" / gse


def load_series(gse: str, cache: Path) -> Series:
    """Family SOFT (cached; its final name only exists once fully downloaded) -> Series."""
    gse = gse.upper()
    url = family_soft_url(gse)
    dest = _series_dir(cache, gse) / f"{gse}_family.soft.gz"
    _shared_file(url, dest, gse)
    series = parse_family_soft(dest, gse)
    series.soft_url = url
    return series


def series_of_sample(gsm: str, cache: Path) -> str:
    """The GSE a GSM belongs to, from the sample's SOFT (``!Sample_series_id``).

    A sample often lists a SubSeries and its SuperSeries; the first one whose family SOFT
    exists is used (both list the sample).
    """
    gsm = gsm.upper()
    dest = cache / "geo" / ".samples" / f"{gsm}.soft"
    url = f"{query_url()}?acc={gsm}&targ=self&form=text&view=brief"
    _shared_file(url, dest, gsm)
    text = dest.read_bytes()
    if text[:2] == b"\x1f\x8b":
        text = gzip.decompress(text)
    found = re.findall(r"^!Sample_series_id\s*=\s*(GSE\d+)", text.decode("utf-8", "replace"), re.M)
    if not found:
        dest.unlink(missing_ok=True)
        raise FetchError(f"{gsm}: GEO returned no series for this sample ({url}); check the accession.")
    last: FetchError | None = None
    for gse in dict.fromkeys(found):
        try:
            load_series(gse, cache)
            return gse
        except FetchError as exc:
            last = exc
    assert last is not None
    raise last


def _human_or_raise(sample: Sample, gse: str) -> None:
    if sample.organism.strip().lower() != HUMAN.lower():
        raise FetchError(
            f"{sample.gsm} ({gse}) is {sample.organism}, not {HUMAN}: spavis curates human "
            "Visium slices only."
        )


def fetch_slices(ids: Sequence[str], rows: Sequence[Any], *, cache: Path, workers: int = 4,
                 with_images: bool = False) -> list[Path]:
    """Fetch GEO slices given GSE/GSM ids and/or manifest rows (accession GSE + GSM)."""
    cache = Path(cache)
    plan: dict[str, dict[str, Any]] = {}  # gse -> {gsm: row|None} ; "*" = all human Visium
    for acc in ids:
        acc = acc.strip().upper()
        if re.fullmatch(r"GSE\d+", acc):
            plan.setdefault(acc, {})["*"] = None
        elif re.fullmatch(r"GSM\d+", acc):
            plan.setdefault(series_of_sample(acc, cache), {})[acc] = None
        else:
            raise FetchError(f"{acc!r} is not a GEO accession; use GSE… (a series) or GSM… (a sample).")
    for row in rows:
        accs = [a.upper() for a in (row.accession or [])] + [str(row.slide_id).upper()]
        gsm = next((a for a in accs if re.fullmatch(r"GSM\d+", a)), None)
        gse = next((a for a in accs if re.fullmatch(r"GSE\d+", a)), None)
        if gsm is None:
            raise FetchError(f"manifest row {row.slide_id}: no GSM accession; GEO rows need one.")
        gse = gse or series_of_sample(gsm, cache)
        plan.setdefault(gse, {})[gsm] = row

    out: list[Path] = []
    for gse, wanted in plan.items():
        out.extend(_fetch_series(gse, wanted, cache, workers, with_images))
    return out


def _fetch_series(gse: str, wanted: dict[str, Any], cache: Path, workers: int,
                  with_images: bool) -> list[Path]:
    series = load_series(gse, cache)
    all_of_series = "*" in wanted
    targets = [g for g in series.samples] if all_of_series else [g for g in wanted if g != "*"]
    for g in targets:
        if g not in series.samples:
            raise FetchError(f"{g}: not listed in {gse}'s family SOFT ({series.soft_url}).")

    skipped_species: dict[str, str] = {}
    plans: list[tuple[Sample, dict[str, str], str]] = []  # sample, role->name, "loose"|"tar"
    tar_members: list[str] | None = None
    for g in targets:
        s = series.samples[g]
        if s.organism.strip().lower() != HUMAN.lower():
            if not all_of_series or g in wanted:
                _human_or_raise(s, gse)
            skipped_species[g] = s.organism
            continue
        loose = visium_set([u.rsplit("/", 1)[-1] for u in s.supplementary], with_images=with_images)
        if loose:
            plans.append((s, loose, "loose"))
            continue
        if series.raw_tar_url:
            if tar_members is None:
                tar_members = _tar_members_if_needed(series, cache, targets, wanted)
            if tar_members:
                mine = [m for m in tar_members if m.rsplit("/", 1)[-1].upper().startswith(g + "_")]
                packed = visium_set(mine, with_images=with_images)
                if packed:
                    plans.append((s, packed, "tar"))
                    continue
        if not all_of_series or g in wanted:
            raise FetchError(
                f"{g} ({gse}): no Visium file set found (need tissue positions and a count matrix "
                f"among the sample's supplementary files or in {gse}_RAW.tar)."
            )
    if not plans:
        species = f" (non-human samples skipped: {', '.join(sorted(set(skipped_species.values())))})" if skipped_species else ""
        raise FetchError(f"{gse}: no human Visium sample found{species}.")
    for g, org in skipped_species.items():
        log.warning("%s (%s) skipped: %s is not %s", g, gse, org, HUMAN)
    return [_fetch_sample(series, s, files, how, wanted.get(s.gsm), cache, workers)
            for s, files, how in plans]


def _tar_members_if_needed(series: Series, cache: Path, targets: list[str], wanted: dict) -> list[str]:
    """Download the series RAW.tar (once, cached) and list its files."""
    tar = _raw_tar(series, cache)
    return archive.list_members(tar)


def _raw_tar(series: Series, cache: Path) -> Path:
    url = series.raw_tar_url
    assert url
    dest = _series_dir(cache, series.gse) / url.rsplit("/", 1)[-1]
    return _shared_file(url, dest, series.gse)


def _shared_file(url: str, dest: Path, label: str) -> Path:
    """Series-level files (SOFT, RAW.tar) are shared by slices: lock, then fetch once.

    A final name only exists for a complete download, so an existing file is reused
    without asking the server (GEO publishes no checksums for these).
    """
    from filelock import FileLock

    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if not dest.is_file():
            download.fetch_file(url, dest, label=label)
    return dest


def _fetch_sample(series: Series, s: Sample, files: dict[str, str], how: str, row: Any,
                  cache: Path, workers: int) -> Path:
    meta = _metadata(series, s, row)
    expected = dict(getattr(row, "checksums", None) or {})
    with sidecar.slice_folder(cache, "geo", s.gsm) as folder:
        if how == "loose":
            url_by_name = {u.rsplit("/", 1)[-1]: u for u in s.supplementary}
            jobs = []
            for name in files.values():
                known = folder.known(name)
                jobs.append(download.Job(url=url_by_name[name], dest=folder.path / name,
                                         size=known.get("size"), sha256=known.get("sha256"),
                                         md5=_md5(expected.get(name)), label=f"{s.gsm} ({series.gse})"))
            records = download.download_many(jobs, workers=workers)
            entries = download.iter_records(records, folder.path)
        else:
            entries = _from_tar(series, s, files, folder)
        sidecar.write_sidecar(folder.path, files=entries, **meta)
    return folder.final


def _from_tar(series: Series, s: Sample, files: dict[str, str], folder: sidecar.SliceFolder) -> dict:
    names = list(files.values())
    base = {n: n.rsplit("/", 1)[-1] for n in names}
    have = all(
        (folder.path / b).is_file() and folder.known(b).get("size") == (folder.path / b).stat().st_size
        and folder.known(b).get("sha256") for b in base.values()
    )
    tar_url = series.raw_tar_url
    entries: dict[str, dict] = {}
    if have:  # re-run: already extracted and recorded; do not touch the tar
        for n, b in base.items():
            k = folder.known(b)
            entries[b] = {"size": k["size"], "sha256": k["sha256"], "md5": None, "url": f"{tar_url}#{n}"}
        return entries
    tar = _raw_tar(series, _cache_of(folder))
    paths = archive.safe_extract(tar, folder.path, members=names, flatten=True)
    for n, p in zip(names, paths):
        sha, _ = download.hash_file(p)
        entries[p.name] = {"size": p.stat().st_size, "sha256": sha, "md5": None, "url": f"{tar_url}#{n}"}
    return entries


def _cache_of(folder: sidecar.SliceFolder) -> Path:
    return folder.final.parent.parent  # CACHE/geo/<GSM> -> CACHE


def _md5(checksum: str | None) -> str | None:
    if checksum and checksum.lower().startswith("md5:"):
        return checksum.split(":", 1)[1]
    return None


def _metadata(series: Series, s: Sample, row: Any) -> dict[str, Any]:
    """slice.json fields: manifest values win over what SOFT text suggests."""
    organ = guess_organ(s)
    condition = guess_condition(s.text())
    meta = {
        "slide_id": s.gsm,
        "source": "geo",
        "accession": [series.gse, s.gsm],
        "organ": organ,
        "species": s.organism,
        "condition": condition,
        "technology": "Visium",
        "license": LICENSE,
        "citation": series.citation(),
        "revision": None,
        "data_path": ".",
        "title": s.title,
        "source_urls": [series.soft_url] + ([series.raw_tar_url] if series.raw_tar_url else []),
    }
    if row is not None:
        for key in ("organ", "condition", "license", "citation", "technology"):
            val = getattr(row, key, None)
            if val:
                meta[key] = val
    return meta
