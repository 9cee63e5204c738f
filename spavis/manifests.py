"""Slice manifests: versioned lists of real public slices per source (files in ``manifests/``).

A manifest is a CSV (or TSV) with one row per slice and the columns of ``COLUMNS``. List
columns (``accession``, ``expected_files``) are ``;``-separated, ``checksums`` holds
``file=md5:<hex>`` / ``file=sha256:<hex>`` pairs separated by ``;`` and ``extra`` is a JSON
object. ``ROW_SCHEMA`` (JSON Schema of one parsed row) is the single source of truth; it is
written to ``manifests/schema.json`` by ``manifests/build_manifests.py``.

Why CSV: manifests are reviewed in pull requests and opened in spreadsheets; one line per
slice keeps diffs readable.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from spavis.errors import ManifestError, SpavisError  # noqa: F401
from spavis.format.io import atomic_write_text

COLUMNS = ("slide_id", "source", "accession", "organ", "species", "condition", "technology",
           "license", "citation", "expected_files", "checksums", "extra")
SOURCES = ("geo", "hest", "stimage", "stomicsdb", "sodb", "tenx")
from spavis.format.vocabulary import CONDITIONS  # noqa: E402  (defined once, in spavis.format)
_SAFE_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
_REL_PATH = r"^(?!/)(?!.*(^|/)\.\.(/|$))[^\\\x00]+$"

ROW_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://spavis.invalid/manifests/schema.json",
    "title": "SpaVis manifest row",
    "description": "One public slice: what `spavis fetch --manifest` downloads and `build-shards` records.",
    "type": "object",
    "additionalProperties": False,
    "required": list(COLUMNS),
    "properties": {
        "slide_id": {"type": "string", "pattern": _SAFE_ID,
                     "description": "Folder name under CACHE/<source>/ (letters, digits, '.', '_', '-')."},
        "source": {"enum": list(SOURCES)},
        "accession": {"type": "array", "items": {"type": "string", "minLength": 1},
                      "description": "Public accessions, e.g. [GSE144239, GSM4284316] or [TENX152]."},
        "organ": {"type": "string", "minLength": 1, "pattern": "^[a-z0-9 ()/-]+$",
                  "description": "Lower-case organ name (harmonized across sources)."},
        "species": {"const": "Homo sapiens"},
        "condition": {"enum": list(CONDITIONS)},
        "technology": {"type": "string", "minLength": 1},
        "license": {"type": "string", "minLength": 1},
        "citation": {"type": "string"},
        "expected_files": {"type": "array", "items": {"type": "string", "pattern": _REL_PATH},
                           "description": "Files (relative to the source root) a fetch must land."},
        "checksums": {"type": "object",
                      "propertyNames": {"pattern": _REL_PATH},
                      "additionalProperties": {"type": "string", "pattern": "^(md5:[0-9a-f]{32}|sha256:[0-9a-f]{64})$"},
                      "description": "Published checksums: file -> 'md5:<hex>' | 'sha256:<hex>'."},
        "extra": {"type": "object", "description": "Source-specific fields (sizes, urls, image files, raw labels)."},
    },
}



@dataclass
class ManifestRow:
    """One slice of a manifest (field meanings: ``ROW_SCHEMA``)."""

    slide_id: str
    source: str
    accession: list[str] = field(default_factory=list)
    organ: str = "unknown"
    species: str = "Homo sapiens"
    condition: str = "unknown"
    technology: str = "Visium"
    license: str = ""
    citation: str = ""
    expected_files: list[str] = field(default_factory=list)
    checksums: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_record(self) -> dict[str, str]:
        """The CSV cells of this row."""
        return {
            "slide_id": self.slide_id, "source": self.source, "accession": ";".join(self.accession),
            "organ": self.organ, "species": self.species, "condition": self.condition,
            "technology": self.technology, "license": self.license, "citation": self.citation,
            "expected_files": ";".join(self.expected_files),
            "checksums": ";".join(f"{k}={v}" for k, v in sorted(self.checksums.items())),
            "extra": json.dumps(self.extra, sort_keys=True, ensure_ascii=False, separators=(",", ":")),
        }


# ---------------------------------------------------------------------------- parsing
def _split(cell: str) -> list[str]:
    return [p.strip() for p in (cell or "").split(";") if p.strip()]


def _parse_record(rec: dict[str, str | None]) -> dict[str, Any]:
    """CSV cells -> row dict (raises ValueError with the column name on malformed cells)."""
    out: dict[str, Any] = {k: (rec.get(k) or "").strip() for k in COLUMNS}
    out["accession"] = _split(out["accession"])
    out["expected_files"] = _split(out["expected_files"])
    checks: dict[str, str] = {}
    for pair in _split(out["checksums"]):
        name, sep, value = pair.rpartition("=")
        if not sep or not name:
            raise ValueError(f"checksums: {pair!r} is not 'file=md5:<hex>'")
        checks[name] = value.lower()
    out["checksums"] = checks
    try:
        extra = json.loads(out["extra"]) if out["extra"] else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"extra: not JSON ({exc.msg})") from None
    out["extra"] = extra
    return out


def _read_records(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str | None]]]]:
    """Header and (line number, record) pairs; comment lines starting with '#' are skipped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found; give a path such as manifests/hest-v1.csv.") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason}); save the manifest as UTF-8 CSV.") from None
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    lines = [(i, line) for i, line in enumerate(text.splitlines(keepends=True), 1) if not line.startswith("#")]
    reader = csv.DictReader(io.StringIO("".join(line for _, line in lines)), delimiter=delimiter)
    header = list(reader.fieldnames or [])
    records = []
    for rec in reader:
        # csv may consume several physical lines per record: map back via line_num
        records.append((lines[min(reader.line_num, len(lines)) - 1][0], rec))
    return header, records


def resolve_manifest(path_or_name: str | os.PathLike) -> Path:
    """A path, or a bundled name such as ``hest-v1`` (looked up in the project's ``manifests/``)."""
    path = Path(path_or_name)
    if path.exists() or path.suffix:
        return path
    bundled = Path(__file__).resolve().parents[1] / "manifests"
    for suffix in (".csv", ".tsv"):
        if (bundled / f"{path.name}{suffix}").is_file():
            return bundled / f"{path.name}{suffix}"
    return path


def validate_manifest(path: str | os.PathLike) -> list[str]:
    """Every problem of a manifest as 'line N (slide_id): message'; empty when valid."""
    from jsonschema import Draft202012Validator

    path = resolve_manifest(path)
    header, records = _read_records(path)
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        return [f"header: missing column(s) {', '.join(missing)} (expected {', '.join(COLUMNS)})"]
    unknown = [c for c in header if c not in COLUMNS]
    problems = [f"header: unknown column(s) {', '.join(unknown)}"] if unknown else []
    validator = Draft202012Validator(ROW_SCHEMA)
    seen: dict[tuple[str, str], int] = {}
    for line, rec in records:
        sid = (rec.get("slide_id") or "").strip() or "?"
        where = f"line {line} ({sid})"
        if None in rec:  # more cells than header columns
            problems.append(f"{where}: more cells than columns; quote cells that contain commas")
            continue
        try:
            row = _parse_record(rec)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        for err in sorted(validator.iter_errors(row), key=lambda e: list(e.path)):
            col = ".".join(str(p) for p in err.path) or "row"
            problems.append(f"{where}: {col}: {err.message}")
        key = (row["source"], row["slide_id"])
        if key in seen:
            problems.append(f"{where}: duplicate slide_id (first on line {seen[key]})")
        else:
            seen[key] = line
        if row["source"] == "geo" and not any(re.fullmatch(r"GSM\d+", a) for a in row["accession"]):
            problems.append(f"{where}: accession: GEO rows need a GSM accession")
    if not records:
        problems.append("file: no rows")
    return problems


def load_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read and validate a manifest; raise ManifestError naming the bad rows."""
    path = resolve_manifest(path)
    problems = validate_manifest(path)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ManifestError(f"{path}: {len(problems)} problem(s):\n  {shown}{more}\n"
                            f"Fix these rows (see manifests/schema.json) and run `spavis manifest validate {path}`.")
    _, records = _read_records(path)
    return [ManifestRow(**_parse_record(rec)) for _, rec in records]


def write_manifest(rows: Iterable[ManifestRow], path: str | os.PathLike, *,
                   header_comment: Sequence[str] = ()) -> Path:
    """Write rows as CSV atomically (sorted as given; '#' comment lines first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    for line in header_comment:
        buf.write(f"# {line}\n")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), delimiter=delimiter, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.to_record())
    atomic_write_text(path, buf.getvalue())
    return path


def summarize(rows: Sequence[ManifestRow]) -> dict[str, Any]:
    """Composition counts (by source, organ, condition, license) for data cards."""
    from collections import Counter

    def count(attr: str) -> dict[str, int]:
        return dict(sorted(Counter(getattr(r, attr) for r in rows).items(), key=lambda kv: (-kv[1], kv[0])))

    return {"n_slices": len(rows), "by_source": count("source"), "by_organ": count("organ"),
            "by_condition": count("condition"), "by_license": count("license"),
            "by_technology": count("technology")}


__all__ = ["COLUMNS", "CONDITIONS", "ROW_SCHEMA", "ManifestError", "ManifestRow", "load_manifest",
           "resolve_manifest", "summarize", "validate_manifest", "write_manifest"]
