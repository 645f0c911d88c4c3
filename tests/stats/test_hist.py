"""Histogram quantiles and the Hill estimator against exact numpy computations."""

import numpy as np

from rldiag.stats import hist


def test_quantile_error_bound_on_heavy_tails() -> None:
    rng = np.random.default_rng(1)
    for dist in (rng.standard_t(1.5, 200_000) * 0.1, rng.lognormal(-3, 2, 200_000), rng.exponential(1e-4, 50_000)):
        counts = np.bincount(hist.signed_index(dist), minlength=hist.N_SIGNED)[None]
        for q in (0.001, 0.05, 0.5, 0.9, 0.99, 0.999):
            est = hist.quantiles(counts, q)[0]
            exact = np.quantile(dist, q, method="inverted_cdf")
            if abs(exact) >= 2.0**-20:
                assert abs(est / exact - 1) <= hist.RELATIVE_ERROR + 1e-12, (q, est, exact)


def test_hill_estimate_tracks_exact_estimator() -> None:
    rng = np.random.default_rng(2)
    for alpha in (0.8, 1.5, 3.0):
        lr = np.log1p(rng.pareto(alpha, 100_000))
        counts = np.bincount(hist.signed_index(lr), minlength=hist.N_SIGNED)[None]
        tail = np.sort(lr[lr > 0])[::-1]
        k = int(np.clip(np.floor(np.sqrt(tail.size)), 10, tail.size - 1))
        exact = 1 / (tail[:k].mean() - tail[k])
        assert abs(hist.hill_alpha(counts)[0] / exact - 1) < 0.05


def test_hill_estimate_of_many_rows_is_each_rows_own() -> None:
    """More rows than hill_alpha takes at a time (it works in blocks to reuse its temporaries): every row's
    value is the one it gets alone, bit for bit, rows too thin for a tail included."""
    rng = np.random.default_rng(3)
    rows = 2 * hist._ROW_BLOCK + 37
    counts = np.zeros((rows, hist.N_SIGNED))
    for i in range(rows):
        n = int(rng.integers(0, 400))
        lr = np.log1p(rng.pareto(1.0 + i % 3, n)) * rng.choice([-1.0, 1.0], n)
        counts[i] = np.bincount(hist.signed_index(lr), minlength=hist.N_SIGNED)
    got = hist.hill_alpha(counts)
    assert got.shape == (rows,)
    alone = np.concatenate([hist.hill_alpha(counts[i : i + 1]) for i in range(rows)])
    np.testing.assert_array_equal(got.view(np.int64), alone.view(np.int64))
    assert np.isnan(got).any() and np.isfinite(got).any()
