"""predict-expression heads: closed-form ridge against sklearn, early stopping on a relative improvement."""
from __future__ import annotations

import numpy as np
import pytest

RNG = np.random.default_rng(11)


def test_closed_form_ridge_equals_sklearn():
    from sklearn.linear_model import Ridge

    from stamp.evaluate.heads import _ridge_weights, ridge_regression, standardize

    X = RNG.normal(size=(120, 8))
    Y = (X @ RNG.normal(size=(8, 30)) + RNG.normal(0, 0.5, (120, 30))).astype(np.float32)
    for a in (0.1, 10.0, 1000.0):
        W = _ridge_weights(X - X.mean(0), Y - Y.mean(0), [a])[0]  # centred, as the head's standardized X
        ref = Ridge(alpha=a, fit_intercept=True).fit(X, Y)
        np.testing.assert_allclose(W, ref.coef_.T, rtol=1e-4, atol=1e-5)
    # the head: standardized with the fitting part, penalty picked on validation, refit on fit + val
    fit, val, test = np.arange(0, 80), np.arange(80, 100), np.arange(100, 120)
    P = ridge_regression(X[fit], Y[fit], X[val], Y[val], X[test], alphas=(1e-2,))
    Xa, Xt = standardize(np.concatenate([X[fit], X[val]]), X[test])
    ref = Ridge(alpha=1e-2 * 80 * 100 / 80, fit_intercept=True).fit(Xa, Y[:100]).predict(Xt)
    np.testing.assert_allclose(P, ref, rtol=1e-4, atol=1e-4)
    assert np.corrcoef(P.ravel(), Y[test].ravel())[0, 1] > 0.9


@pytest.mark.parametrize("rel, stops_early", [(0.0, False), (0.5, True)])
def test_mlp_stops_when_the_validation_loss_stops_improving_by_a_fraction(rel, stops_early):
    import torch

    from stamp.evaluate.heads import fit_head

    X = RNG.normal(size=(200, 4)).astype(np.float32)
    y = (X @ RNG.normal(size=(4, 3))).astype(np.float32)
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 3)
    epochs = fit_head(head, torch.nn.functional.mse_loss, X[:150], y[:150], X[150:], y[150:], lr=1e-2, max_epochs=30,
                      patience=2, seed=0, device="cpu", min_rel_delta=rel)
    assert (epochs < 30) == stops_early
