"""Evidence that the gene encoder learns, on GENERATED slices with known domains (spavis.simulate).

Trains the tiny config on CPU (stage 1, IGR), then reports on held-out spots:
* masked-token accuracy of the trained model vs the gene-frequency baseline (always
  predicting the most frequent masked gene) and vs the randomly initialised encoder;
* ARI of KMeans(k = number of domains) on spot embeddings vs the true domains, for the
  trained and the randomly initialised encoder (same seed, same architecture).

    python benchmarks/learning.py [--steps 300] [--slides 2] [--genes 300]

All numbers come from generated data, not real tissue.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def evaluate(model, tokenizer, corpus, domains: dict[str, str], n_domains: int, seed: int = 0) -> dict:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from stamp.objectives import IGNORE, mask_tokens
    from stamp.tokenizer import to_model_input_ids

    model.eval()
    ids_all, spot_ids = [], []
    for table in corpus.iter_slides(columns=["spot_id", "gene_index", "counts"]):
        ids_all.append(to_model_input_ids(tokenizer.encode_table(table), tokenizer.pad_value,
                                          model.config.context_length))
        spot_ids += table.column("spot_id").to_pylist()
    ids = torch.from_numpy(np.concatenate(ids_all).astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    masked = mask_tokens(ids, vocab_size=model.config.vocab_size, generator=g)
    correct = total = 0
    embs = []
    with torch.no_grad():
        for s in range(0, len(ids), 256):
            h = model(masked.input_ids[s:s + 256])
            lab = masked.labels[s:s + 256][:, : h.shape[1]]
            sel = lab != IGNORE
            correct += int((model.mlm_head(h[sel]).argmax(-1) == lab[sel]).sum())
            total += int(sel.sum())
            embs.append(model.embed(ids[s:s + 256]).numpy())
    targets = masked.labels[masked.labels != IGNORE]
    baseline = float(torch.bincount(targets).max()) / len(targets)
    emb = np.concatenate(embs)
    truth = [domains[s] for s in spot_ids]
    pred = KMeans(n_domains, n_init=10, random_state=seed).fit_predict(emb)
    return {"masked_acc": correct / total, "freq_baseline_acc": baseline,
            "ari": float(adjusted_rand_score(truth, pred))}


def run(workdir: Path, *, steps: int, slides: int, genes: int, max_row: int | None, n_domains: int = 4,
        seed: int = 0, batch_size: int = 32, lr: float = 2e-3) -> dict:
    from spavis.corpus import open_corpus
    from stamp.model import create_model
    from stamp.tokenizer import GeneTokenizer
    from stamp.train import PretrainArgs, pretrain
    from stamp_helpers import make_corpus
    from stamp.model import StampGeneEncoder

    root, domains = make_corpus(workdir / "shards", slides=slides, n_genes=genes, max_row=max_row,
                                n_domains=n_domains, seed=seed)
    corpus = open_corpus(root)
    t0 = time.perf_counter()
    model_dir = pretrain(PretrainArgs(stage="gene", data=str(root), out=str(workdir / "run"), config="tiny",
                                      max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 20),
                                      min_lr=lr / 10, save_every=steps, seed=seed, progress=False))
    train_s = time.perf_counter() - t0
    tok = GeneTokenizer.from_pretrained(model_dir)
    trained = evaluate(StampGeneEncoder.from_pretrained(str(model_dir)), tok, corpus, domains, n_domains, seed)
    torch.manual_seed(seed)  # the same initialisation pretrain() starts from
    random = evaluate(create_model("tiny", n_genes=genes), tok, corpus, domains, n_domains, seed)
    return {"data": "GENERATED (spavis.simulate)", "spots": len(domains), "genes": genes, "steps": steps,
            "train_seconds": round(train_s, 1), "trained": trained, "random_init": random}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--slides", type=int, default=2)
    p.add_argument("--genes", type=int, default=300)
    p.add_argument("--max-row", type=int, default=None, help="crop slices to array_row < N (faster)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = run(Path(tmp), steps=a.steps, slides=a.slides, genes=a.genes, max_row=a.max_row, seed=a.seed)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
