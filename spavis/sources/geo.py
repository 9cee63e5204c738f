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
  (safely). Loose files keep their GEO names (``GSMnnnn_…``, gzip'd); packs
  (``…_spatial.tar.gz``, ``…_filtered_feature_bc_matrix.zip``, loose or inside RAW.tar) are
  unpacked into ``spatial/`` and ``filtered_feature_bc_matrix/`` and then removed (see
  ``spavis.sources.visium``); slice.json records each file's origin as ``<archive url>#<member>``
  and the packs themselves under ``archives``. ``read_slice`` reads the folder as is.
"""
from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from spavis.errors import FetchError
from spavis.sources import archive, download, sidecar
from spavis.sources.parallel import SliceTask, run_slices
from spavis.sources.visium import PACKS, check_complete, pack_targets, role_of, visium_set  # noqa: F401

log = logging.getLogger(__name__)

DEFAULT_BASE = "https://ftp.ncbi.nlm.nih.gov/geo"
DEFAULT_QUERY = "https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi"
LICENSE = "GEO public data, see original publication"
HUMAN = "Homo sapiens"

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
    candidates = list(dict.fromkeys(found))
    for gse in candidates:  # one resolved before: no request (a missing SubSeries is not re-asked)
        if (_series_dir(cache, gse) / f"{gse}_family.soft.gz").is_file():
            return gse
    last: FetchError | None = None
    for gse in candidates:
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


def _resolve(ids: Sequence[str], rows: Sequence[Any], cache: Path) -> dict[str, dict[str, Any]]:
    """gse -> {gsm: manifest row | None}; ``"*"`` asks for every human Visium sample."""
    plan: dict[str, dict[str, Any]] = {}
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
        plan.setdefault(gse or series_of_sample(gsm, cache), {})[gsm] = row
    return plan


def plan_slices(ids: Sequence[str], rows: Sequence[Any], *, cache: Path,
                with_images: bool = False) -> list[SliceTask]:
    """Resolve GSE/GSM ids and manifest rows (accession GSE + GSM) to one task per sample.

    Reads each series' family SOFT (and, where a sample's files live only there, lists
    the series RAW.tar) before any slice is fetched.
    """
    cache = Path(cache)
    tasks: list[SliceTask] = []
    for gse, wanted in _resolve(ids, rows, cache).items():
        series = load_series(gse, cache)
        for s, files, origin in _select_samples(series, wanted, cache, with_images):
            row = wanted.get(s.gsm)
            tasks.append(SliceTask(s.gsm, lambda series=series, s=s, files=files, origin=origin, row=row:
                                   _fetch_sample(series, s, files, origin, row, cache, with_images)))
    return tasks


def fetch_slices(ids: Sequence[str], rows: Sequence[Any], *, cache: Path, workers: int = 4,
                 with_images: bool = False) -> list[Path]:
    """Fetch GEO slices given GSE/GSM ids and/or manifest rows, ``workers`` slices at a time."""
    return run_slices(plan_slices(ids, rows, cache=cache, with_images=with_images), workers)


def _select_samples(series: Series, wanted: dict[str, Any], cache: Path,
                    with_images: bool) -> list[tuple[Sample, dict[str, str], str]]:
    """(sample, role -> file name, "loose" | "tar") for every sample to fetch from a series."""
    gse = series.gse
    all_of_series = "*" in wanted
    targets = list(series.samples) if all_of_series else [g for g in wanted if g != "*"]
    for g in targets:
        if g not in series.samples:
            raise FetchError(f"{g}: not listed in {gse}'s family SOFT ({series.soft_url}).")

    skipped_species: dict[str, str] = {}
    plans: list[tuple[Sample, dict[str, str], str]] = []
    tar_members: list[str] | None = None
    for g in targets:
        s = series.samples[g]
        explicit = not all_of_series or g in wanted
        if s.organism.strip().lower() != HUMAN.lower():
            if explicit:
                _human_or_raise(s, gse)
            skipped_species[g] = s.organism
            continue
        names = [u.rsplit("/", 1)[-1] for u in s.supplementary]
        loose = visium_set(names, with_images=with_images)
        if loose:
            if with_images:
                loose.update(_fullres_images(names))
            plans.append((s, loose, "loose"))
            continue
        if series.raw_tar_url:
            if tar_members is None:
                tar_members = archive.list_members(_raw_tar(series, cache))
            mine = [m for m in tar_members if m.rsplit("/", 1)[-1].upper().startswith(g + "_")]
            packed = visium_set(mine, with_images=with_images)
            if packed:
                if with_images:
                    packed.update(_fullres_images(mine))
                plans.append((s, packed, "tar"))
                continue
        if explicit:
            raise FetchError(
                f"{g} ({gse}): no Visium file set found (need tissue positions and a count matrix, "
                f"loose or packed, among the sample's supplementary files or in {gse}_RAW.tar)."
            )
    if not plans:
        species = f" (non-human samples skipped: {', '.join(sorted(set(skipped_species.values())))})" if skipped_species else ""
        raise FetchError(f"{gse}: no human Visium sample found{species}.")
    for g, org in skipped_species.items():
        log.warning("%s (%s) skipped: %s is not %s", g, gse, org, HUMAN)
    return plans


def _fullres_images(names: list[str]) -> dict[str, str]:
    """The sample's full-resolution H&E (Space Ranger's --image input) when the submitter
    uploaded it (``GSMnnnn_*.tif[.gz]`` / ``.jpg[.gz]``), for ``--with-images``."""
    from spavis.images import is_fullres_image_name

    found = sorted(n for n in names if is_fullres_image_name(n))
    return {f"fullres_image_{i}": n for i, n in enumerate(found)}


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


def _reuse(folder: sidecar.SliceFolder, origin: str, with_images: bool) -> dict[str, dict] | None:
    """slice.json entries of files that came from ``origin`` (a URL, or URL#member) and are
    still in place with their recorded size; None when they must be fetched again (also
    when a spatial pack is asked again ``with_images`` but gave no hires image before)."""
    files = (folder.record or {}).get("files", {})
    hits = {n: dict(m) for n, m in files.items()
            if m.get("url") == origin or str(m.get("url", "")).startswith(origin + "#")}
    ok = hits and all(m.get("sha256") and (folder.path / n).is_file()
                      and (folder.path / n).stat().st_size == m.get("size") for n, m in hits.items())
    if ok and with_images and role_of(origin) == "spatial_pack":
        ok = any(role_of(n) == "hires" for n in hits)
    return hits if ok else None


def _entry(path: Path, url: str) -> dict[str, Any]:
    sha, _ = download.hash_file(path)
    return {"size": path.stat().st_size, "sha256": sha, "md5": None, "url": url}


def _fetch_sample(series: Series, s: Sample, files: dict[str, str], origin: str, row: Any,
                  cache: Path, with_images: bool) -> Path:
    """Fetch one sample's files (loose, or from RAW.tar), unpack its packs, write slice.json."""
    label = f"{s.gsm} ({series.gse})"
    expected = dict(getattr(row, "checksums", None) or {})
    packs = {name: role for role, name in files.items() if role in PACKS}
    with sidecar.slice_folder(cache, "geo", s.gsm) as folder:
        staging = folder.path / ".archives"  # packs live here until unpacked (hidden from readers)
        old_archives = dict((folder.record or {}).get("archives") or {})
        entries: dict[str, dict] = {}
        archives: dict[str, dict] = {}
        to_unpack: dict[str, tuple[Path, str]] = {}  # pack name -> (local path, origin url)
        if origin == "loose":
            url_by_name = {u.rsplit("/", 1)[-1]: u for u in s.supplementary}
            jobs = []
            for name in files.values():
                reused = _reuse(folder, url_by_name[name], with_images) if name in packs else None
                if reused is not None:
                    entries.update(reused)
                    archives[name] = old_archives.get(name, {"url": url_by_name[name]})
                    continue
                known = folder.known(name)
                digests = download.expected_digests(expected.get(name))
                jobs.append(download.Job(url=url_by_name[name], dest=(staging if name in packs else folder.path) / name,
                                         size=known.get("size"), sha256=digests["sha256"] or known.get("sha256"),
                                         md5=digests["md5"], label=label))
            for rec in download.download_many(jobs, workers=max(1, len(jobs))):
                if rec.path.name in packs and rec.path.parent == staging:
                    archives[rec.path.name] = rec.sidecar_entry()
                    to_unpack[rec.path.name] = (rec.path, rec.url)
                else:
                    entries.update(download.iter_records([rec], folder.path))
        else:
            tar_url = series.raw_tar_url
            todo = {}
            for name in files.values():
                src = f"{tar_url}#{name}"
                reused = _reuse(folder, src, with_images)
                if reused is not None:
                    entries.update(reused)
                    if name in packs:
                        archives[name] = old_archives.get(name, {"url": src})
                else:
                    todo[name] = src
            if todo:
                tar = _raw_tar(series, cache)
                for name, src in todo.items():
                    where = staging if name in packs else folder.path
                    (path,) = archive.safe_extract(tar, where, members={name: name.rsplit("/", 1)[-1]})
                    if name in packs:
                        archives[name] = _entry(path, src)
                        to_unpack[name] = (path, src)
                    else:
                        entries[path.name] = _entry(path, src)
        for name, (path, src) in to_unpack.items():
            entries.update(_unpack(path, packs[name], src, folder.path, label, with_images))
        shutil.rmtree(staging, ignore_errors=True)
        check_complete(entries, label, f"{series.gse}'s files for {s.gsm}")
        sidecar.write_sidecar(folder.path, files=entries, **_metadata(series, s, row),
                              **({"archives": archives} if archives else {}))
    return folder.final


def _unpack(pack: Path, role: str, src: str, dest: Path, label: str, with_images: bool) -> dict[str, dict]:
    """Extract what a reader needs from one pack (safely) into ``dest``; entries for slice.json."""
    members = archive.list_members(pack, files_only=False)  # a link named like a wanted file is refused
    targets = pack_targets(role, members, with_images=with_images)
    if not targets:
        raise FetchError(f"{label}: {pack.name} ({src}) holds none of the expected Space Ranger "
                         f"files; its members: {', '.join(members[:5])}{' …' if len(members) > 5 else ''}.")
    paths = archive.safe_extract(pack, dest, members=targets)
    return {p.relative_to(dest).as_posix(): _entry(p, f"{src}#{m}") for m, p in zip(targets, paths)}


def _metadata(series: Series, s: Sample, row: Any) -> dict[str, Any]:
    """slice.json fields: manifest values win over what SOFT text suggests."""
    meta = {
        "slide_id": s.gsm,
        "source": "geo",
        "accession": [series.gse, s.gsm],
        "organ": guess_organ(s),
        "species": s.organism,
        "condition": guess_condition(s.text()),
        "technology": "Visium",
        "license": LICENSE,
        "citation": series.citation(),
        "revision": None,
        "data_path": ".",
        "title": s.title,
        "source_urls": [series.soft_url] + ([series.raw_tar_url] if series.raw_tar_url else []),
    }
    meta.update(sidecar.row_fields(row))
    return meta
