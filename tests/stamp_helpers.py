"""Small shard corpora for the stamp tests and the learning benchmark, from GENERATED slices.

Built with the real pipeline: ``spavis.simulate.write_simulated_slice`` writes Space Ranger-like
folders (real Ensembl ids: the first ``n_genes`` human genes of the stamp-v1 vocabulary), and
``spavis.shards.build_shards`` turns them into shards with a vocabulary of exactly those genes
(so the tiny model's vocabulary stays small and tests stay fast). ``max_row`` keeps a strip of
the capture area (rows ``< max_row``) so slices hold a few hundred spots. Everything here is
generated data, not measurements.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from spavis.shards import build_shards
from spavis.genes import Vocabulary, load_vocabulary
from spavis.simulate import write_simulated_slice


@lru_cache(maxsize=4)
def gene_subset(n_genes: int) -> Vocabulary:
    """The first ``n_genes`` human genes of stamp-v1, as a vocabulary of their own."""
    stamp = load_vocabulary("stamp-v1")
    ids = [str(e) for e in stamp.ensembl_ids if str(e).startswith("ENSG")][:n_genes]
    return Vocabulary(f"stamp-v1-first-{n_genes}", ids, [stamp.symbols[stamp.index[e]] for e in ids],
                      source="stamp-v1 subset (tests)")


def make_corpus(
    root: Path,
    *,
    slides: int = 1,
    n_genes: int = 300,
    max_row: int | None = 30,
    n_domains: int = 4,
    seed: int = 0,
    k: int = 8,
    n_markers: int | None = None,
    tissue_fraction: float | None = None,
    min_genes: int = 5,
    **simulate_kwargs,
) -> tuple[Path, dict[str, str]]:
    """Build a corpus at ``root`` (one slide per shard); returns (root, {spot_id: true domain}).

    Slides are ``gen0``, ``gen1`` ... (seeds ``seed``, ``seed + 1`` ...); ``n_markers`` per
    domain defaults to a tenth of the genes (at least 10); ``simulate_kwargs`` (e.g.
    ``marker_lfc``, ``median_umis``) go to :func:`spavis.simulate.write_simulated_slice`.
    """
    root = Path(root)
    vocab, folders = write_generated_slices(root, slides=slides, n_genes=n_genes, seed=seed, n_domains=n_domains,
                                            max_row=max_row, n_markers=n_markers, with_image=False,
                                            tissue_fraction=tissue_fraction, **simulate_kwargs)
    build_shards(folders, root, vocab=vocab, min_genes=min_genes, k_neighbors=k, max_spots_per_shard=1)
    domains = generated_domains(folders)
    kept = _spot_ids(root)
    return root, {s: domains[s] for s in kept}


def write_generated_slices(root: Path, *, slides: int, n_genes: int, seed: int, n_domains: int,
                           max_row: int | None, n_markers: int | None = None,
                           **simulate_kwargs) -> tuple[Vocabulary, list[Path]]:
    """The generated input slices ``gen0``, ``gen1`` ... of a test corpus at ``root``: kept in a
    hidden sibling folder, written once (a rebuild of the same corpus reuses them)."""
    vocab = gene_subset(n_genes)
    inputs = Path(root).parent / f".{Path(root).name}-inputs"
    folders = []
    for s in range(slides):
        folder = inputs / f"gen{s}"
        if not folder.is_dir():
            write_simulated_slice(folder, genes=list(vocab.ensembl_ids), symbols=list(vocab.symbols),
                                  seed=seed + s, n_domains=n_domains, max_row=max_row,
                                  n_markers=n_markers if n_markers is not None else max(10, n_genes // 10),
                                  **simulate_kwargs)
        folders.append(folder)
    return vocab, folders


def generated_domains(folders: list[Path]) -> dict[str, str]:
    """{spot_id: true domain} of generated slices (their ``generated.json``)."""
    domains = {}
    for folder in folders:
        truth = json.loads((folder / "generated.json").read_text())["domains"]
        domains.update({f"{folder.name}:{bc}": d for bc, d in truth.items()})
    return domains


def _spot_ids(root: Path) -> list[str]:
    from spavis.corpus import open_corpus

    ids: list[str] = []
    for table in open_corpus(root).iter_slides(columns=["spot_id"]):
        ids += table.column("spot_id").to_pylist()
    return ids


def random_init_model(model_dir: Path, out: Path) -> Path:
    """The encoder ``pretrain`` starts from (same seed, config and tokenizer), saved untrained.

    ``pretrain`` seeds ``torch.manual_seed(seed)`` and calls ``create_model`` before anything
    else draws random numbers, so this is exactly its step-0 model.
    """
    import torch

    from stamp.models.gene_encoder import create_model
    from stamp.tokenizer import GeneTokenizer

    args = json.loads((Path(model_dir).parent / "train_args.json").read_text())
    torch.manual_seed(args["seed"])
    tok = GeneTokenizer.from_pretrained(model_dir)
    model = create_model(args["config"], n_genes=tok.n_genes)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


def learning_metrics(model_dir: Path, corpus: Path, domains: dict[str, str], *, seed: int = 0,
                     mask_seed: int = 12345, max_masked_spots: int = 2048) -> dict[str, float]:
    """Masked-token accuracy (vs the gene-frequency baseline on the same masked positions) and
    ARI of KMeans(k = number of true domains) on ``stamp embed`` embeddings.

    Baseline: always predict the gene most frequent among the masked targets themselves (the
    best any constant guess can do on these positions); both on the first ``max_masked_spots``
    spots. Embeddings (all spots) come from the public
    :func:`stamp.embed.genes.embed_corpus`, so this scores what users get.
    """
    import tempfile

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from spavis.corpus import open_corpus
    from stamp.embed.genes import embed_corpus, load_model
    from stamp.training.objectives import IGNORE, mask_tokens
    from stamp.tokenizer import to_model_input_ids

    model, tok = load_model(model_dir, device="cpu")
    parts = [to_model_input_ids(tok.encode_table(t), tok.pad_value, model.config.context_length)
             for t in open_corpus(corpus).iter_slides(columns=["spot_id", "gene_index", "counts"])]
    ids = torch.from_numpy(np.concatenate(parts)[:max_masked_spots].astype(np.int64))
    masked = mask_tokens(ids, vocab_size=model.config.vocab_size, n_reserved=model.config.n_reserved,
                         generator=torch.Generator().manual_seed(mask_seed))
    sel = masked.labels != IGNORE
    preds = []
    with torch.no_grad():
        for s in range(0, len(ids), 256):
            h = model(masked.input_ids[s:s + 256])
            preds.append(model.mlm_head(h[sel[s:s + 256]]).argmax(-1))
    targets = masked.labels[sel]
    acc = float((torch.cat(preds) == targets).float().mean())
    baseline = float(torch.bincount(targets).max()) / len(targets)

    with tempfile.TemporaryDirectory() as tmp:
        out = embed_corpus(model_dir, corpus, Path(tmp) / "emb.parquet", device="cpu", progress=False)
        table = pq.read_table(out)
        emb = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
        truth = [domains[s] for s in table.column("spot_id").to_pylist()]
    pred = KMeans(len(set(truth)), n_init=10, random_state=seed).fit_predict(emb)
    return {"masked_acc": acc, "freq_baseline_acc": baseline,
            "ari": float(adjusted_rand_score(truth, pred)), "n_masked": int(targets.numel()), "n_spots": len(truth)}
