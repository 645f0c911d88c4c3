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
