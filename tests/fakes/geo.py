"""A loopback GEO: the real file-tree layout, real SOFT text adapted to spatial series.

* ``GSE146540`` (real SOFT text from tests/data/geo/soft/GSE146540, 6 human samples):
  two samples get real Visium files built from the real 10x human heart fixture, served
  loose and gzip'd with ``GSMnnnn_`` prefixes (GSM4391934 as an mtx triplet, GSM4391935 as
  ``filtered_feature_bc_matrix.h5``); the other four keep their real ``NONE``.
* ``GSE138657`` (real SOFT text, 16 human samples): two samples' Visium files live only in
  ``GSE138657_RAW.tar`` (the older GEO pattern), the sample lines say ``NONE``.
  Three more samples carry Space Ranger *packs* as GEO submitters often upload them:
  GSM4115598 ``…_filtered_feature_bc_matrix.tar.gz`` + ``…_spatial.tar.gz`` (loose),
  GSM4115599 a loose ``…_filtered_feature_bc_matrix.h5`` + ``…_spatial.zip``, and
  GSM4115600 both packs (``.tar``) inside ``GSE138657_RAW.tar``. ``expected_unpacked``
  holds the files each should end up with (paths inside the slice folder).
* ``GSE105845`` (GEOparse's real mouse family SOFT): its samples are *Mus musculus* with a
  complete Visium set, to test rejection.

Layout: ``/geo/series/GSE146nnn/GSE146540/soft/GSE146540_family.soft.gz``,
``/geo/samples/GSM4391nnn/GSM4391934/suppl/<file>``, ``/geo/series/.../suppl/GSE…_RAW.tar``,
and the sample query ``/geo/query/acc.cgi?acc=GSM…&targ=self&form=text``.
"""
from __future__ import annotations

import gzip
import io
import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from fakes.http import FileServer

FTP = "ftp://ftp.ncbi.nlm.nih.gov/geo"
DATABASE = """^DATABASE = GeoMiame
!Database_name = Gene Expression Omnibus (GEO)
!Database_institute = NCBI NLM NIH
!Database_web_link = http://www.ncbi.nlm.nih.gov/geo
!Database_email = geo@ncbi.nlm.nih.gov
"""


def stub(acc: str) -> str:
    return acc[:3] + acc[3:-3] + "nnn"


def visium_files(fixture: Path, prefix: str, *, mtx: bool) -> dict[str, bytes]:
    """Real Visium outputs of the fixture, as GEO submitters upload them (gzip'd, prefixed)."""
    files: dict[str, bytes] = {}
    spatial = fixture / "spatial"
    gz = lambda b: gzip.compress(b, mtime=0)  # noqa: E731 - deterministic bytes
    if mtx:
        import h5py
        import scipy.io
        import scipy.sparse as sp

        with h5py.File(fixture / "filtered_feature_bc_matrix.h5", "r") as f:
            m = f["matrix"]
            shape = tuple(m["shape"][()])
            X = sp.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=shape)
            barcodes = [b.decode() for b in m["barcodes"][()]]
            ids = [b.decode() for b in m["features/id"][()]]
            names = [b.decode() for b in m["features/name"][()]]
        buf = io.BytesIO()
        scipy.io.mmwrite(buf, X.tocoo())
        files[f"{prefix}_matrix.mtx.gz"] = gz(buf.getvalue())
        files[f"{prefix}_barcodes.tsv.gz"] = gz(("\n".join(barcodes) + "\n").encode())
        files[f"{prefix}_features.tsv.gz"] = gz(
            "".join(f"{i}\t{n}\tGene Expression\n" for i, n in zip(ids, names)).encode())
    else:
        files[f"{prefix}_filtered_feature_bc_matrix.h5"] = (fixture / "filtered_feature_bc_matrix.h5").read_bytes()
    files[f"{prefix}_tissue_positions_list.csv.gz"] = gz((spatial / "tissue_positions_list.csv").read_bytes())
    files[f"{prefix}_scalefactors_json.json.gz"] = gz((spatial / "scalefactors_json.json").read_bytes())
    files[f"{prefix}_tissue_lowres_image.png.gz"] = gz((spatial / "tissue_lowres_image.png").read_bytes())
    files[f"{prefix}_tissue_hires_image.png.gz"] = gz((spatial / "tissue_hires_image.png").read_bytes())
    return files


def _tar_bytes(files: dict[str, bytes], *, gz: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if gz else raw


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in sorted(files.items()):
            zf.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def visium_packs(fixture: Path, prefix: str, *, fmt: str, h5: bool = False) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Space Ranger outputs packed as GEO submitters do: (files to serve, expected unpacked files).

    ``fmt``: "tar.gz", "tar" or "zip". The packs hold Space Ranger's own folder names and a
    few files a reader does not need (fiducials image, a macOS resource fork).
    """
    loose = visium_files(fixture, prefix, mtx=True)
    plain = {k[len(prefix) + 1:]: v for k, v in loose.items()}  # drop the GEO prefix
    spatial = {f"spatial/{n[:-3]}": gzip.decompress(plain[n]) for n in
               ("tissue_positions_list.csv.gz", "scalefactors_json.json.gz", "tissue_lowres_image.png.gz",
                "tissue_hires_image.png.gz")}
    spatial["spatial/aligned_fiducials.jpg"] = b"\xff\xd8 not needed"
    spatial["__MACOSX/spatial/._tissue_positions_list.csv"] = b"resource fork"
    matrix = {f"filtered_feature_bc_matrix/{n}": plain[n] for n in
              ("barcodes.tsv.gz", "features.tsv.gz", "matrix.mtx.gz")}
    pack = (lambda f: _zip_bytes(f)) if fmt == "zip" else (lambda f: _tar_bytes(f, gz=fmt == "tar.gz"))
    served = {f"{prefix}_spatial.{fmt}": pack(spatial)}
    expected = {k: v for k, v in spatial.items() if k.startswith("spatial/tissue_") and "hires" not in k}
    expected["spatial/scalefactors_json.json"] = spatial["spatial/scalefactors_json.json"]
    if h5:
        name = f"{prefix}_filtered_feature_bc_matrix.h5"
        served[name] = expected[name] = (fixture / "filtered_feature_bc_matrix.h5").read_bytes()
    else:
        served[f"{prefix}_filtered_feature_bc_matrix.{fmt}"] = pack(matrix)
        expected.update(matrix)
    return served, expected


def _sample_blocks(gsm_soft: str) -> dict[str, str]:
    blocks = re.split(r"(?m)^(?=\^SAMPLE = )", gsm_soft)
    return {re.match(r"\^SAMPLE = (\S+)", b).group(1): b for b in blocks if b.startswith("^SAMPLE")}


def _set_supplementary(block: str, urls: list[str]) -> str:
    block = re.sub(r"(?m)^!Sample_supplementary_file_\d+ = .*\n", "", block)
    lines = "".join(f"!Sample_supplementary_file_{i} = {u}\n" for i, u in enumerate(urls, 1)) or \
        "!Sample_supplementary_file_1 = NONE\n"
    return re.sub(r"(?m)^(!Sample_series_id)", lines.rstrip("\n") + "\n\\1", block, count=1)


def _set_characteristics(block: str, chars: list[str]) -> str:
    block = re.sub(r"(?m)^!Sample_characteristics_ch1 = .*\n", "", block)
    add = "".join(f"!Sample_characteristics_ch1 = {c}\n" for c in chars)
    return re.sub(r"(?m)^(!Sample_taxid_ch1 = .*\n)", "\\1" + add.replace("\\", r"\\"), block, count=1)


@dataclass
class FakeGEO:
    """Build the tree on a FileServer; ``expected`` maps GSM -> files it should yield."""

    server: FileServer
    shared: Path
    expected: dict[str, dict[str, bytes]] = field(default_factory=dict)
    expected_unpacked: dict[str, dict[str, bytes]] = field(default_factory=dict)
    sample_soft: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return self.server.url + "/geo"

    def build(self) -> "FakeGEO":
        fixture = self.shared / "visium" / "human_heart_v1_subsample"
        self._loose_series(fixture)
        self._tar_series(fixture)
        self._mouse_series(fixture)
        self.server.route("/geo/query/acc.cgi", self._acc_cgi)
        return self

    # GSE146540: loose files on the sample level
    def _loose_series(self, fixture: Path) -> None:
        gse = "GSE146540"
        root = self.shared / "geo" / "soft" / gse
        series = (root / "GSE.soft").read_text()
        series = series.replace("!Series_type = Expression profiling by high throughput sequencing",
                                "!Series_type = Expression profiling by high throughput sequencing\n!Series_type = Other")
        blocks = _sample_blocks((root / "GSM.soft").read_text())
        plan = {"GSM4391934": ("heart_A1", True, ["tissue: heart", "disease state: clear cell renal cell carcinoma"]),
                "GSM4391935": ("heart_B1", False, ["tissue: Heart", "disease state: healthy donor"])}
        for gsm, (name, mtx, chars) in plan.items():
            files = visium_files(fixture, f"{gsm}_{name}", mtx=mtx)
            urls = []
            for fname, data in files.items():
                self.server.add(f"/geo/samples/{stub(gsm)}/{gsm}/suppl/{fname}", data)
                urls.append(f"{FTP}/samples/{stub(gsm)}/{gsm}/suppl/{fname}")
            blocks[gsm] = _set_characteristics(_set_supplementary(blocks[gsm], urls), chars)
            if gsm == "GSM4391935":  # a healthy section: its real source name says carcinoma cells
                blocks[gsm] = re.sub(r"(?m)^!Sample_source_name_ch1 = .*$",
                                     "!Sample_source_name_ch1 = left ventricle", blocks[gsm])
            self.expected[gsm] = {k: v for k, v in files.items() if "hires" not in k}
        self._publish(gse, series, blocks)

    # GSE138657: Visium files only inside GSE138657_RAW.tar
    def _tar_series(self, fixture: Path) -> None:
        gse = "GSE138657"
        root = self.shared / "geo" / "soft" / gse
        series = (root / "GSE.soft").read_text()
        blocks = _sample_blocks((root / "GSM.soft").read_text())
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for gsm, name in (("GSM4114982", "HCT116_visium"), ("GSM4114983", "OxR_visium")):
                files = visium_files(fixture, f"{gsm}_{name}", mtx=False)
                self.expected[gsm] = {k: v for k, v in files.items() if "hires" not in k}
                blocks[gsm] = _set_supplementary(blocks[gsm], [])
                for fname, data in sorted(files.items()):
                    info = tarfile.TarInfo(fname)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
            gsm = "GSM4115600"  # both packs inside the RAW.tar
            served, self.expected_unpacked[gsm] = visium_packs(fixture, f"{gsm}_HCT116_visium", fmt="tar")
            blocks[gsm] = _set_supplementary(blocks[gsm], [])
            for fname, data in sorted(served.items()):
                info = tarfile.TarInfo(fname)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
            other = b"gene\tfpkm\n"
            info = tarfile.TarInfo("GSM4115516_diffloopgene_HCT116.txt.gz")
            info.size = len(other)
            tar.addfile(info, io.BytesIO(other))
        self.server.add(f"/geo/series/{stub(gse)}/{gse}/suppl/{gse}_RAW.tar", buf.getvalue())
        for gsm, fmt, h5 in (("GSM4115598", "tar.gz", False), ("GSM4115599", "zip", True)):
            served, self.expected_unpacked[gsm] = visium_packs(fixture, f"{gsm}_visium", fmt=fmt, h5=h5)
            urls = []
            for fname, data in served.items():
                self.server.add(f"/geo/samples/{stub(gsm)}/{gsm}/suppl/{fname}", data)
                urls.append(f"{FTP}/samples/{stub(gsm)}/{gsm}/suppl/{fname}")
            blocks[gsm] = _set_supplementary(blocks[gsm], urls)
        self._publish(gse, series, blocks)

    # GSE105845: GEOparse's real mouse family SOFT, with two Visium samples added
    def _mouse_series(self, fixture: Path) -> None:
        gse = "GSE105845"
        text = (self.shared / "geo" / "geoparse_fixtures" / f"{gse}_family.soft").read_text()
        human = _sample_blocks((self.shared / "geo" / "soft" / "GSE146540" / "GSM.soft").read_text())
        template = human["GSM4391934"]
        samples = []
        for gsm in ("GSM2828511", "GSM2828512"):
            block = template.replace("GSM4391934", gsm).replace("Homo sapiens", "Mus musculus") \
                .replace("!Sample_taxid_ch1 = 9606", "!Sample_taxid_ch1 = 10090") \
                .replace("GSE146540", gse)
            files = visium_files(fixture, f"{gsm}_brain", mtx=False)
            urls = []
            for fname, data in files.items():
                self.server.add(f"/geo/samples/{stub(gsm)}/{gsm}/suppl/{fname}", data)
                urls.append(f"{FTP}/samples/{stub(gsm)}/{gsm}/suppl/{fname}")
            samples.append(_set_supplementary(block, urls))
            self.sample_soft[gsm] = samples[-1]
        family = text.rstrip("\n") + "\n" + "".join(samples)
        self.server.add(f"/geo/series/{stub(gse)}/{gse}/soft/{gse}_family.soft.gz",
                        gzip.compress(family.encode(), mtime=0))

    def _publish(self, gse: str, series: str, blocks: dict[str, str]) -> None:
        family = DATABASE + series.rstrip("\n") + "\n" + "".join(blocks.values())
        self.server.add(f"/geo/series/{stub(gse)}/{gse}/soft/{gse}_family.soft.gz",
                        gzip.compress(family.encode(), mtime=0))
        self.sample_soft.update(blocks)

    def _acc_cgi(self, handler, path: str, query: dict):
        acc = query.get("acc", "").upper()
        text = self.sample_soft.get(acc)
        if text is None:
            return 404, {"Content-Type": "text/plain"}, b"not found\n"
        return 200, {"Content-Type": "text/plain"}, text.encode()
