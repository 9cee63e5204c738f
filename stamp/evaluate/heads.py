"""Small heads trained on frozen features: the linear probe, the 3-layer regression MLP, closed-form
ridge and the BLEEP-style query-reference (knn).

One training loop: Adam, mini-batches in a seeded order, at most ``max_epochs`` epochs,
early stopping on the validation loss with ``patience`` epochs, the best epoch's weights
kept. Features are standardized with the fitting part's mean / sd (the test part never
informs any statistic).
"""
from __future__ import annotations

import copy

import numpy as np

PROBE_EPOCHS, PROBE_PATIENCE = 100, 5
MLP_EPOCHS, MLP_PATIENCE, MLP_LR, MLP_HIDDEN = 100, 3, 1e-4, 512
# an epoch "improves" when it lowers the best validation loss by more than this fraction of it: the MLP's
# validation MSE creeps down by < 1 % an epoch for dozens of epochs after its real progress (measured on
# the 3-slide generated corpus, benchmarks/evaluate_expression.py); the probe keeps the absolute 1e-6
MLP_MIN_REL_DELTA = 1e-2
BATCH_SIZE = 256


def standardize(fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu = fit.mean(axis=0)
    sd = fit.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return [((x - mu) / sd).astype(np.float32) for x in (fit, *others)]


def fit_head(head, loss_fn, X_fit, y_fit, X_val, y_val, *, lr: float, max_epochs: int, patience: int,
             seed: int, device: str, batch_size: int = BATCH_SIZE, min_rel_delta: float = 0.0):
    """Train ``head`` in place (best validation epoch restored); returns the number of epochs run.

    Stops after ``patience`` epochs without an improvement of the best validation loss by more than
    ``min_rel_delta`` of it (and 1e-6). Uses the threads torch is given (``torch.set_num_threads``; all
    cores by default): no cap, nothing else computes while a head trains."""
    return _fit_head(head, loss_fn, X_fit, y_fit, X_val, y_val, lr=lr, max_epochs=max_epochs, patience=patience,
                     seed=seed, device=device, batch_size=batch_size, min_rel_delta=min_rel_delta)


def _fit_head(head, loss_fn, X_fit, y_fit, X_val, y_val, *, lr: float, max_epochs: int, patience: int,
              seed: int, device: str, batch_size: int, min_rel_delta: float = 0.0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    head.to(device)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    Xf, yf = torch.as_tensor(X_fit, device=device), torch.as_tensor(y_fit, device=device)
    Xv, yv = torch.as_tensor(X_val, device=device), torch.as_tensor(y_val, device=device)
    best, best_state, bad, epoch = float("inf"), copy.deepcopy(head.state_dict()), 0, 0
    for epoch in range(1, max_epochs + 1):
        head.train()
        order = torch.randperm(len(Xf), generator=gen).to(device)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(head(Xf[idx]), yf[idx]).backward()
            opt.step()
        if len(Xv) == 0:
            continue
        head.eval()
        with torch.no_grad():
            val = float(loss_fn(head(Xv), yv))
        if val < best - max(1e-6, min_rel_delta * abs(best) if np.isfinite(best) else 0.0):
            best, best_state, bad = val, copy.deepcopy(head.state_dict()), 0
        else:
            bad += 1
            if bad >= patience:
                break
    if len(Xv):
        head.load_state_dict(best_state)
    head.eval()
    return epoch


def linear_probe(X_fit, y_fit, X_val, y_val, X_test, *, n_classes: int, lr: float, seed: int, device: str,
                 max_epochs: int = PROBE_EPOCHS, patience: int = PROBE_PATIENCE) -> np.ndarray:
    """Class predictions (int) for ``X_test`` from one linear layer trained with cross-entropy."""
    import torch

    X_fit, X_val, X_test = standardize(X_fit, X_val, X_test)
    torch.manual_seed(seed)
    head = torch.nn.Linear(X_fit.shape[1], n_classes)
    fit_head(head, torch.nn.functional.cross_entropy, X_fit, np.asarray(y_fit, np.int64), X_val,
             np.asarray(y_val, np.int64), lr=lr, max_epochs=max_epochs, patience=patience, seed=seed, device=device)
    with torch.no_grad():
        return head(torch.as_tensor(X_test, device=device)).argmax(-1).cpu().numpy()


def mlp_regression(X_fit, Y_fit, X_val, Y_val, X_test, *, seed: int, device: str, lr: float = MLP_LR,
                   hidden: int = MLP_HIDDEN, max_epochs: int = MLP_EPOCHS, patience: int = MLP_PATIENCE,
                   min_rel_delta: float = MLP_MIN_REL_DELTA) -> np.ndarray:
    """Predicted expression for ``X_test``: Linear-ReLU-Linear-ReLU-Linear trained with MSE."""
    import torch
    from torch import nn

    X_fit, X_val, X_test = standardize(X_fit, X_val, X_test)
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(X_fit.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, Y_fit.shape[1]))
    fit_head(head, nn.functional.mse_loss, X_fit, Y_fit.astype(np.float32), X_val, Y_val.astype(np.float32),
             lr=lr, max_epochs=max_epochs, patience=patience, seed=seed, device=device, min_rel_delta=min_rel_delta)
    with torch.no_grad():
        return head(torch.as_tensor(X_test, device=device)).cpu().numpy()


def knn_regression(ref_features: np.ndarray, ref_expression: np.ndarray, query_features: np.ndarray, *,
                   k: int = 50, device: str = "cpu", chunk: int = 4096) -> np.ndarray:
    """BLEEP-style query-reference prediction: each query's top-``k`` cosine neighbours among the
    references, weighted by their similarity (negative similarities weigh 0), averaged expression."""
    import torch

    k = int(min(k, len(ref_features)))
    ref = torch.nn.functional.normalize(torch.as_tensor(ref_features, device=device, dtype=torch.float32), dim=1)
    expr = torch.as_tensor(ref_expression, device=device, dtype=torch.float32)
    out = []
    for s in range(0, len(query_features), chunk):
        q = torch.nn.functional.normalize(torch.as_tensor(query_features[s:s + chunk], device=device,
                                                          dtype=torch.float32), dim=1)
        sim, idx = (q @ ref.T).topk(k, dim=1)
        w = sim.clamp(min=0)
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))  # all dissimilar: plain mean
        w = w / w.sum(1, keepdim=True)
        # the weighted mean, one neighbour rank at a time: never a (queries, k, genes) block in memory
        pred = torch.zeros((len(q), expr.shape[1]), device=device, dtype=torch.float32)
        for j in range(k):
            pred.addcmul_(w[:, j:j + 1], expr[idx[:, j]])
        out.append(pred.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, ref_expression.shape[1]), np.float32)

RIDGE_ALPHAS = tuple(10.0 ** np.arange(-2, 5))  # x n_fit: penalties tried on the validation split


def _ridge_weights(X: np.ndarray, Y: np.ndarray, alphas) -> list[np.ndarray]:
    """Ridge solutions (X^T X + a I)^-1 X^T Y for every ``a``, from one SVD of X (closed form)."""
    U, s, Vt = np.linalg.svd(X.astype(np.float64), full_matrices=False)
    UtY = U.T.astype(np.float32) @ Y  # (k, genes): the only product with the (spots, genes) targets
    return [((Vt.T * (s / (s * s + a))).astype(np.float32) @ UtY) for a in alphas]


def ridge_regression(X_fit, Y_fit, X_val, Y_val, X_test, *, alphas=RIDGE_ALPHAS) -> np.ndarray:
    """Predicted expression for ``X_test``: ridge in closed form on standardized features (intercept = the
    fitting part's mean), the penalty (``alphas`` x n) chosen by the validation MSE, then refit on fit + val."""
    X_all = np.concatenate([X_fit, X_val])
    Y_all = np.concatenate([Y_fit, Y_val]).astype(np.float32, copy=False)
    n = max(len(X_fit), 1)
    scaled = [a * n for a in alphas]
    if len(X_val):
        Xf, Xv = standardize(X_fit, X_val)
        mu = Y_fit.mean(axis=0)
        Ws = _ridge_weights(Xf, Y_fit - mu, scaled)
        errs = [float(((Xv @ W + mu - Y_val) ** 2).mean()) for W in Ws]
        best = scaled[int(np.argmin(errs))]
    else:
        best = scaled[len(scaled) // 2]
    Xa, Xt = standardize(X_all, X_test)
    mu = Y_all.mean(axis=0)
    W = _ridge_weights(Xa, Y_all - mu, [best * len(X_all) / n])[0]
    return (Xt @ W + mu).astype(np.float32)
