"""Tokenizer files: ``vocab.json``, ``gene_means.safetensors``, ``tokenizer_config.json``.

The means are a float64 safetensors tensor ``mean`` (exact, NaN kept) with the Ensembl
ids / symbols in its metadata: huggingface_hub flags .parquet files in model repos as data
files, safetensors it does not. Folders saved before that hold ``gene_means.parquet``,
which is still read. Every file is written atomically and group-readable as the umask
allows (``spavis.format.io``). The vocabulary checksum (:func:`vocabulary_sha256`) is
stored in the config so a model can be checked against a corpus by content, not length.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from spavis.format.io import atomic_open, atomic_write_text
from stamp.constants import CLS_ID, MASK_ID, N_RESERVED, PAD_ID
from stamp.errors import TokenizerError

if TYPE_CHECKING:
    from stamp.tokenizer.core import GeneTokenizer

VOCAB_FILE = "vocab.json"
MEANS_FILE = "gene_means.safetensors"
LEGACY_MEANS_FILE = "gene_means.parquet"
CONFIG_FILE = "tokenizer_config.json"


# Keys of a converted release's tokenizer_config.json: the released means are not redistributed,
# so the folder says it needs them (MEANS_REQUIRED_KEY) and which registered file fits (MEANS_KEY).
MEANS_REQUIRED_KEY = "means_required"
MEANS_KEY = "means_key"


def vocabulary_sha256(gene_ids: Sequence[str]) -> str:
    """The vocabulary fingerprint (``spavis.format.vocabulary``, the one definition): sha256 of the
    ordered Ensembl ids, one per line; written to tokenizer_config.json as ``vocab_sha256``."""
    from spavis.format.vocabulary import vocabulary_fingerprint

    return vocabulary_fingerprint(gene_ids)


def save_tokenizer(tok: "GeneTokenizer", save_directory: str | os.PathLike) -> Path:
    """Write the three tokenizer files (each atomically); a legacy gene_means.parquet is removed."""
    from safetensors.numpy import save

    import numpy as np

    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {"<mask>": MASK_ID, "<pad>": PAD_ID, "<cls>": CLS_ID}
    vocab.update({g: i + N_RESERVED for i, g in enumerate(tok.gene_ids)})
    metadata = {"format": "stamp.gene_means.v1", "ensembl_id": json.dumps(tok.gene_ids)}
    if tok.symbols is not None:
        metadata["symbol"] = json.dumps(tok.symbols)
    tensors = {"mean": np.ascontiguousarray(tok.raw_means, dtype=np.float64)}
    atomic_write_text(out / VOCAB_FILE, json.dumps(vocab, indent=0) + "\n")
    with atomic_open(out / MEANS_FILE, "wb") as fh:
        fh.write(save(tensors, metadata=metadata))
    atomic_write_text(out / CONFIG_FILE, json.dumps(tok.config(), indent=2) + "\n")
    (out / LEGACY_MEANS_FILE).unlink(missing_ok=True)
    return out


def tokenizer_dir(repo_or_dir: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                  cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder holding the tokenizer files: ``repo_or_dir`` itself or a Hub snapshot (fails fast)."""
    path = Path(repo_or_dir)
    if path.is_dir():
        return path
    from stamp.errors import ModelNotFoundError
    from stamp.hub_access import snapshot

    try:
        return snapshot(str(repo_or_dir), revision=revision, token=token, cache_dir=cache_dir,
                        allow_patterns=[VOCAB_FILE, MEANS_FILE, LEGACY_MEANS_FILE, CONFIG_FILE])
    except ModelNotFoundError as exc:
        raise TokenizerError(f"{repo_or_dir} is neither a tokenizer folder nor a reachable Hub repo: {exc}") from None


def load_tokenizer(cls: type, repo_or_dir: str | os.PathLike, *, revision: str | None = None,
                   token: str | None = None, cache_dir: str | os.PathLike | None = None,
                   **overrides: Any) -> "GeneTokenizer":
    """Read a tokenizer folder (or Hub repo) into ``cls`` (:class:`GeneTokenizer`)."""
    path = tokenizer_dir(repo_or_dir, revision=revision, token=token, cache_dir=cache_dir)
    means_path = path / MEANS_FILE if (path / MEANS_FILE).is_file() else path / LEGACY_MEANS_FILE
    missing = [n for n in (VOCAB_FILE, means_path.name, CONFIG_FILE) if not (path / n).is_file()]
    if missing:
        raise TokenizerError(f"{path} lacks {', '.join(missing)}; save it with GeneTokenizer.save_pretrained")
    config = json.loads((path / CONFIG_FILE).read_text())
    vocab = json.loads((path / VOCAB_FILE).read_text())
    genes = sorted(((i, g) for g, i in vocab.items() if i >= N_RESERVED))
    gene_ids = [g for _, g in genes]
    if [i for i, _ in genes] != list(range(N_RESERVED, N_RESERVED + len(gene_ids))):
        raise TokenizerError(f"{path / VOCAB_FILE}: gene token ids are not contiguous from {N_RESERVED}")
    try:
        if means_path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(means_path), framework="np") as f:
                meta = f.metadata() or {}
                means = f.get_tensor("mean")
            order = json.loads(meta["ensembl_id"])
            symbols = json.loads(meta["symbol"]) if "symbol" in meta else None
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(means_path)
            order, means = table.column("ensembl_id").to_pylist(), table.column("mean").to_numpy()
            symbols = table.column("symbol").to_pylist() if "symbol" in table.column_names else None
    except (KeyError, ValueError, OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {means_path} ({type(exc).__name__}: {exc}); "
                             "save the tokenizer again with GeneTokenizer.save_pretrained") from exc
    if order != gene_ids:
        raise TokenizerError(f"{means_path} is not in the order of {path / VOCAB_FILE}")
    from spavis.format.vocabulary import recorded_fingerprint

    stored = recorded_fingerprint(config)
    if stored is not None and stored != vocabulary_sha256(gene_ids):
        raise TokenizerError(f"{path / VOCAB_FILE} does not match the vocab_sha256 of {path / CONFIG_FILE}; "
                             "the folder mixes two tokenizers: save it again with GeneTokenizer.save_pretrained")
    kwargs = dict(mode=config.get("mode", "native"), max_length=config.get("max_length"),
                  mean_source=config.get("mean_source", "nonzero_mean_cp10k"))
    kwargs.update(overrides)
    return cls(gene_ids, means, symbols=symbols, **kwargs)
