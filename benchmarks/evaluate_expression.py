"""How long ``stamp evaluate predict-expression`` takes on a laptop-sized corpus, per head.

The corpus: three GENERATED slices (``spavis.simulate`` defaults, seeds 1000-1002 as every benchmark,
~10,000 spots, the stamp-v1 vocabulary; not real tissue). One model: the tiny gene encoder after one
pretraining step (the timing is about the heads, not the encoder), plus both baselines (random-init
and PCA). The run is ``stamp.evaluate``'s own code: features once, then every head on every feature set
and leave-one-slide-out fold; the time of every head is printed, with the metrics (mean over folds).

Same-run baseline: the MLP head of the first feature set and fold with torch on one thread (the former
cap) against the threads torch is given; the ratio is printed.

``--reference`` (about 15 more minutes on 2 cores) also fits the former MLP protocol (Adam 1e-4, up to 100
epochs) on the same feature sets and folds, and the current one with two more seeds: it prints, per
feature set, the current metrics, their seed-to-seed range and the former metrics, and whether the
former fall within the range widened by the current protocol's own spread ("same metrics within noise").

    python benchmarks/evaluate_expression.py [--work DIR] [--threads 2] [--heads knn ridge mlp] [--reference]

Build and pretraining are cached in ``--work`` (default: a folder under the system temp dir).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def corpus_and_model(work: Path) -> tuple[Path, Path]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _generated import generated_corpus

    corpus = work / "corpus"
    if not (corpus / "manifest.json").is_file():
        generated_corpus(work, 3)
    model = work / "run" / "model"
    if not (model / "model.safetensors").is_file():
        from stamp.training.gene import PretrainArgs, pretrain

        pretrain(PretrainArgs(stage="gene", data=str(corpus), out=str(work / "run"), config="tiny", max_steps=1,
                              batch_size=8, warmup_steps=1, save_every=1, seed=0, progress=False))
    return corpus, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "stamp-bench-evaluate-expression")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, all cores)")
    p.add_argument("--heads", nargs="+", default=None, help="heads to time (default: knn ridge mlp)")
    p.add_argument("--no-compare", action="store_true", help="skip the one-thread MLP comparison")
    p.add_argument("--reference", action="store_true",
                   help="also run the former MLP protocol (Adam 1e-4) and more seeds: metrics side by side")
    a = p.parse_args()

    import numpy as np
    import torch

    from spavis.format import open_corpus
    from stamp.evaluate import feature_sets, load_eval_data
    from stamp.evaluate.splits import carve_validation, make_folds
    from stamp.evaluate.tasks import check_heads, expression_targets, predict_expression_task

    if a.threads:
        torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    corpus_dir, model = corpus_and_model(a.work)
    print(f"corpus + model ready in {time.perf_counter() - t0:.1f} s (cached in {a.work})")

    t_all = time.perf_counter()
    t0 = time.perf_counter()
    ev = load_eval_data(open_corpus(corpus_dir))
    print(f"GENERATED corpus: {len(ev.slides)} slides, {ev.n_spots:,} spots, {len(ev.gene_ids):,} genes; "
          f"torch threads {torch.get_num_threads()}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sets = feature_sets([str(model)], ev, device="cpu", seed=0)
    t_feat = time.perf_counter() - t0
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    rows, extras = predict_expression_task(ev, sets, seed=0, device="cpu", tick=lambda: None,
                                           heads=check_heads(a.heads), timings=timings)
    t_task = time.perf_counter() - t0
    total = time.perf_counter() - t_all
    print(f"features (model, random-init, pca): {t_feat:.1f} s; predict-expression: {t_task:.1f} s "
          f"(targets + folds + heads); total {total:.1f} s = {total / 60:.2f} min")
    for head, s in timings.items():
        print(f"  head {head:5s}: {s:7.1f} s over {len(sets)} feature sets x {len(make_folds(ev.slide_ids))} folds")
    import pandas as pd

    df = pd.DataFrame(rows)
    print(df.groupby(["method", "model"], sort=False)[["mse", "pcc_v", "pcc_e"]].mean().round(4).to_string())

    if not a.no_compare:
        # same-run baseline: two MLP epochs of one fold with the threads torch is given vs one thread
        # (the former cap)
        from torch import nn

        from stamp.evaluate.heads import MLP_HIDDEN, MLP_LR, fit_head, standardize

        Y, _, _ = expression_targets(ev)
        fold = make_folds(ev.slide_ids)[0]
        fit, val = carve_validation(fold.train, seed=0)
        Xf, Xv = standardize(sets[0].features[fit], sets[0].features[val])
        got = {}
        many = torch.get_num_threads()
        for n in dict.fromkeys((many, 1)):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            head = nn.Sequential(nn.Linear(Xf.shape[1], MLP_HIDDEN), nn.ReLU(), nn.Linear(MLP_HIDDEN, MLP_HIDDEN),
                                 nn.ReLU(), nn.Linear(MLP_HIDDEN, Y.shape[1]))
            t0 = time.perf_counter()
            fit_head(head, nn.functional.mse_loss, Xf, Y[fit], Xv, Y[val], lr=MLP_LR, max_epochs=2, patience=99,
                     seed=0, device="cpu")
            got[n] = time.perf_counter() - t0
        torch.set_num_threads(many)
        print(f"MLP, 2 epochs of fold {fold.name}, {sets[0].name}: {many} threads {got[many]:.1f} s, 1 thread "
              f"{got[1]:.1f} s (1-thread / {many}-thread = {got[1] / max(got[many], 1e-9):.2f})")
    if a.reference:
        reference(ev, sets, rows)
    del np


def reference(ev, sets, rows) -> None:
    """The former MLP protocol (Adam 1e-4) and the current one at seeds 1, 2 on the same folds: metrics
    averaged over folds, per feature set."""
    import numpy as np
    import pandas as pd

    from stamp.evaluate.heads import FORMER_MLP_LR, MLP_LR, mlp_regression, run_concurrently
    from stamp.evaluate.metrics import expression_metrics, top_genes
    from stamp.evaluate.splits import carve_validation, make_folds
    from stamp.evaluate.tasks import expression_targets

    Y, _, _ = expression_targets(ev)
    hvg, heg = top_genes(Y, np.arange(Y.shape[1]))
    current = pd.DataFrame(rows)
    current = current[current["method"] == "mlp"].assign(run="current seed 0")
    extra = []
    for label, lr, seed in (("current seed 1", MLP_LR, 1), ("current seed 2", MLP_LR, 2),
                            (f"former (Adam {FORMER_MLP_LR:g}) seed 0", FORMER_MLP_LR, 0)):
        t0 = time.perf_counter()

        def job(fs, fold, lr=lr, seed=seed, label=label):
            def run(stop):
                fit, val = carve_validation(fold.train, seed=0)
                P = mlp_regression(fs.features[fit], Y[fit], fs.features[val], Y[val], fs.features[fold.test],
                                   seed=seed, device="cpu", lr=lr, stop=stop)
                return {"run": label, "model": fs.name, "fold": fold.name,
                        **expression_metrics(Y[fold.test], P, hvg, heg)}
            return run

        extra += run_concurrently([job(fs, fold) for fs in sets for fold in make_folds(ev.slide_ids, seed=0)],
                                  device="cpu")
        print(f"reference: MLP {label}: {time.perf_counter() - t0:.1f} s", flush=True)
    df = pd.concat([current[["run", "model", "fold", "mse", "pcc_v", "pcc_e"]], pd.DataFrame(extra)])
    means = df.groupby(["model", "run"], sort=False)[["mse", "pcc_v", "pcc_e"]].mean()
    print(means.round(4).to_string())
    for model in dict.fromkeys(df["model"]):
        m = means.loc[model]
        cur = m[m.index.str.startswith("current")]
        former = m[m.index.str.startswith("former")].iloc[0]
        for metric in ("mse", "pcc_v", "pcc_e"):
            lo, hi = cur[metric].min(), cur[metric].max()
            spread = hi - lo
            inside = lo - spread <= former[metric] <= hi + spread
            print(f"{model:12s} {metric:6s} current {lo:.4f} .. {hi:.4f} (3 seeds), former {former[metric]:.4f}: "
                  f"{'within' if inside else 'OUTSIDE'} the current range +- its spread")


if __name__ == "__main__":
    main()
