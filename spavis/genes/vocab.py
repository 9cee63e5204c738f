"""Gene vocabularies: the fixed, ordered gene list a corpus (and the STAMP encoder) is expressed in.

A vocabulary is index <-> Ensembl id <-> symbol. Presets ship as package data
(spavis/data/vocab/<name>.json); any vocab.json in the same format can be loaded by path.
"""
from __future__ import annotations

import hashlib
import json
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from spavis.errors import SpavisError, VocabularyError  # noqa: F401
from spavis.format.io import atomic_write_text

DEFAULT_PRESET = "stamp-v1"
PRESETS = ("stamp-v1", "gencode48-pc-mt")
DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # package data



class Vocabulary:
    """An ordered gene vocabulary. Column i of harmonized data is gene `ensembl_ids[i]`."""

    def __init__(self, name: str, ensembl_ids: Sequence[str], symbols: Sequence[str] | None = None,
                 *, version: str = "", source: str = "") -> None:
        ids = [str(e) for e in ensembl_ids]
        syms = [str(s) for s in (symbols if symbols is not None else [""] * len(ids))]
        if len(syms) != len(ids):
            raise VocabularyError(f"vocabulary {name!r}: {len(ids)} ids but {len(syms)} symbols")
        if len(set(ids)) != len(ids):
            dup = sorted({e for e in ids if ids.count(e) > 1})[:5]
            raise VocabularyError(f"vocabulary {name!r} repeats Ensembl ids {dup}; each gene must appear once")
        self.name = name
        self.version = version
        self.source = source
        self.ensembl_ids = np.array(ids, dtype=object)
        self.symbols = np.array(syms, dtype=object)

    def __len__(self) -> int:
        return len(self.ensembl_ids)

    def __repr__(self) -> str:
        return f"Vocabulary(name={self.name!r}, n_genes={len(self)}, checksum={self.checksum[:12]}...)"

    @cached_property
    def index(self) -> dict[str, int]:
        """Ensembl id (verbatim, as stored) -> column index."""
        return {e: i for i, e in enumerate(self.ensembl_ids)}

    def index_of(self, ensembl_id: str) -> int | None:
        """Column of a gene, or None when the vocabulary does not hold it."""
        return self.index.get(ensembl_id)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "version": self.version, "source": self.source,
            "genes": [{"index": i, "ensembl_id": e, "symbol": s}
                      for i, (e, s) in enumerate(zip(self.ensembl_ids, self.symbols))],
        }

    def to_json(self) -> str:
        """vocab.json text: one gene per line so diffs stay readable."""
        d = self.to_dict()
        head = json.dumps({k: d[k] for k in ("name", "version", "source")}, ensure_ascii=False)
        genes = ",\n".join(json.dumps(g, ensure_ascii=False) for g in d["genes"])
        return head[:-1] + ', "genes": [\n' + genes + "\n]}\n"

    @cached_property
    def checksum(self) -> str:
        """sha256 of the canonical JSON (sorted keys, no whitespace) of to_dict(): this vocab.json file
        (name, version, symbols included; recorded as manifest ``vocabulary.checksum`` and in build keys).
        Model compatibility is :attr:`fingerprint`."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    @cached_property
    def fingerprint(self) -> str:
        """The vocabulary's identity (ordered Ensembl ids), as stamp checks it:
        :func:`spavis.format.vocabulary.vocabulary_fingerprint`. Unlike :attr:`checksum` it ignores
        name, version and symbols (two vocab.json files of the same genes in the same order match)."""
        from spavis.format.vocabulary import vocabulary_fingerprint

        return vocabulary_fingerprint(self.ensembl_ids)

    def write(self, path: str | Path) -> Path:
        """Write vocab.json atomically."""
        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def from_dict(cls, d: dict, origin: str = "<dict>") -> "Vocabulary":
        try:
            genes = sorted(d["genes"], key=lambda g: int(g["index"]))
            if [int(g["index"]) for g in genes] != list(range(len(genes))):
                raise VocabularyError(f"{origin}: gene indices must be 0..n-1 without gaps")
            return cls(str(d["name"]), [g["ensembl_id"] for g in genes],
                       [g.get("symbol") or "" for g in genes],
                       version=str(d.get("version", "")), source=str(d.get("source", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise VocabularyError(
                f"{origin} is not a vocab.json ({exc!r}); expected "
                '{"name", "version", "source", "genes": [{"index", "ensembl_id", "symbol"}, ...]} '
                "as written by `spavis genes vocab PRESET --out vocab.json`") from exc


@lru_cache(maxsize=8)
def _load_preset(name: str) -> Vocabulary:
    text = (DATA_DIR / "vocab" / f"{name}.json").read_text("utf-8")
    return Vocabulary.from_dict(json.loads(text), origin=f"preset {name}")


def load_vocabulary(preset_or_path: str | Path | Vocabulary = DEFAULT_PRESET) -> Vocabulary:
    """A preset name ('stamp-v1', 'gencode48-pc-mt'), a vocab.json path, or a Vocabulary (returned as is)."""
    if isinstance(preset_or_path, Vocabulary):
        return preset_or_path
    key = str(preset_or_path)
    if key in PRESETS:
        return _load_preset(key)
    path = Path(key)
    if not path.is_file():
        raise VocabularyError(
            f"unknown vocabulary {key!r}: not a preset ({', '.join(PRESETS)}) and no such file; "
            "pass a preset name or a vocab.json path")
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VocabularyError(f"{path}: cannot read vocab.json ({exc}); re-export it with "
                              "`spavis genes vocab PRESET --out vocab.json`") from exc
    return Vocabulary.from_dict(data, origin=str(path))
