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


def _mlp_data(n=300, d=6, g=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    Y = np.log1p(np.exp(X @ rng.normal(size=(d, g)) * 0.5)).astype(np.float32)
    return X, Y


def test_concurrent_fits_equal_the_same_fits_one_at_a_time_on_one_thread():
    """run_concurrently: N fits at once (one torch thread each) give exactly what each gives alone on one
    thread, in job order, with one progress tick per fit."""
    import torch

    from stamp.evaluate.heads import mlp_regression, run_concurrently

    X, Y = _mlp_data()
    jobs = [(seed, lr) for seed in (0, 1, 2) for lr in (1e-3, 3e-3)]

    def job(seed, lr):
        return lambda stop: mlp_regression(X[:200], Y[:200], X[200:250], Y[200:250], X[250:], seed=seed,
                                           device="cpu", lr=lr, max_epochs=6, stop=stop)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = [job(s, lr)(None) for s, lr in jobs]
    finally:
        torch.set_num_threads(before)
    ticks = []
    torch.set_num_threads(2)
    try:
        together = run_concurrently([job(s, lr) for s, lr in jobs], device="cpu", on_done=lambda: ticks.append(1))
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert len(ticks) == len(jobs)
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(alone[0], alone[2])  # seeds differ: the comparison can fail


def test_a_failing_fit_stops_the_others_and_raises():
    import threading

    import torch

    from stamp.evaluate.heads import FitsCancelled, mlp_regression, run_concurrently

    X, Y = _mlp_data(n=2000, g=200)
    stopped = []

    def long_fit(stop):
        try:
            return mlp_regression(X[:1800], Y[:1800], X[1800:1900], Y[1800:1900], X[1900:], seed=0, device="cpu",
                                  max_epochs=10_000, patience=10_000, stop=stop)
        except FitsCancelled:
            stopped.append(threading.current_thread().name)
            raise

    def bad(stop):
        raise ValueError("a broken fold")

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="a broken fold"):
            run_concurrently([long_fit, bad, long_fit], device="cpu")
    finally:
        torch.set_num_threads(before)
    assert len(stopped) >= 1  # the running long fit was told to stop (the queued one never started)
