"""Downsampling keeps every spike and both ends; EMA matches a plain loop; histograms merge by addition."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from app.downsample import bucket_sum, downsample, ema


def _reference_buckets(x: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket of each interior point by a plain loop over equal-width edges (the independent reference)."""
    inner = x[1:-1]
    lo, hi = inner[0], inner[-1]
    width = (hi - lo) / buckets
    out = []
    for v in inner:
        b = int((v - lo) // width) if width > 0 else 0
        out.append(min(b, buckets - 1))
    return np.array(out)


def test_a_single_spike_survives_heavy_downsampling():
    x = np.arange(100_000)
    y = np.sin(x / 500.0)
    y[61_234] = 40.0
    y[7_000] = -25.0
    env = downsample(x, y, buckets=200)
    assert len(env.x) <= 202
    assert env.hi.max() == 40.0 and env.lo.min() == -25.0
    # the spike is in the bucket that covers its step
    at = np.argmax(env.hi)
    assert abs(env.x[at] - 61_234) < (100_000 / 200)


def test_first_and_last_points_are_exact_and_aggregation_is_deterministic():
    rng = np.random.default_rng(0)
    x = np.arange(5_000) * 2 + 10
    y = rng.normal(size=5_000)
    a = downsample(x, y, buckets=100)
    b = downsample(x, y, buckets=100)
    assert not a.exact
    assert (a.x[0], a.mean[0], a.x[-1], a.mean[-1]) == (10, y[0], x[-1], y[-1])
    for field in ("x", "mean", "lo", "hi"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_bucket_statistics_match_an_independent_reference():
    rng = np.random.default_rng(1)
    x = np.sort(rng.choice(50_000, size=3_000, replace=False)).astype(float)
    y = rng.normal(size=3_000)
    env = downsample(x, y, buckets=50)
    ref = _reference_buckets(x, 50)
    inner = y[1:-1]
    means = [inner[ref == b].mean() for b in np.unique(ref)]
    mins = [inner[ref == b].min() for b in np.unique(ref)]
    maxs = [inner[ref == b].max() for b in np.unique(ref)]
    np.testing.assert_allclose(env.mean[1:-1], means)
    np.testing.assert_allclose(env.lo[1:-1], mins)
    np.testing.assert_allclose(env.hi[1:-1], maxs)


def test_short_series_are_returned_untouched():
    x, y = np.arange(10), np.arange(10) ** 2.0
    env = downsample(x, y, buckets=100)
    assert env.exact
    np.testing.assert_array_equal(env.mean, y)
    np.testing.assert_array_equal(env.lo, y)


def test_nan_points_are_ignored_and_an_all_nan_bucket_is_a_gap():
    x = np.arange(1_000)
    y = np.ones(1_000)
    y[100:300] = np.nan
    y[500] = np.nan
    y[501] = 9.0
    env = downsample(x, y, buckets=10)
    gap = (env.x > 140) & (env.x < 160)  # the bucket [100.8, 200.6) holds only NaN
    assert gap.any() and np.isnan(env.mean[gap]).all()
    assert np.nanmax(env.hi) == 9.0
    assert np.isfinite(env.mean[~np.isnan(env.mean)]).all()


def test_zoom_aggregates_only_the_range_plus_one_neighbour_each_side():
    x = np.arange(10_000)
    y = np.zeros(10_000)
    y[9_000] = 5.0  # outside the zoom
    y[4_321] = 3.0  # inside
    env = downsample(x, y, buckets=100, x_range=(4_000, 5_000))
    assert env.x[0] == 3_999 and env.x[-1] == 5_001
    assert env.hi.max() == 3.0
    # a narrow zoom shows raw points again
    fine = downsample(x, y, buckets=100, x_range=(4_300, 4_350))
    assert fine.exact and 3.0 in fine.mean


@settings(max_examples=200, deadline=None)
@given(
    arrays(np.float64, st.integers(3, 400), elements=st.floats(-1e6, 1e6) | st.just(float("nan"))),
    st.integers(1, 50),
)
def test_envelope_bounds_hold_for_any_series(y, buckets):
    x = np.arange(len(y), dtype=float)
    env = downsample(x, y, buckets=buckets)
    assert len(env.x) <= max(buckets + 2, len(y))
    finite = y[np.isfinite(y)]
    if finite.size:
        assert np.nanmax(env.hi) == finite.max()
        assert np.nanmin(env.lo) == finite.min()
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(env.mean)
        assert (env.lo[ok] <= env.mean[ok] + 1e-9 * (1 + abs(env.mean[ok]))).all()
        assert (env.mean[ok] <= env.hi[ok] + 1e-9 * (1 + abs(env.mean[ok]))).all()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="buckets"):
        downsample(np.arange(3), np.arange(3), buckets=0)
    with pytest.raises(ValueError, match="same length"):
        downsample(np.arange(3), np.arange(4))
    with pytest.raises(ValueError, match="smoothing"):
        ema(np.arange(3.0), 1.0)


def _ema_loop(y: np.ndarray, w: float) -> np.ndarray:
    out, last, debias = [], 0.0, 0.0
    for v in y:
        if not np.isfinite(v):
            out.append(np.nan)
            continue
        last = last * w + (1 - w) * v
        debias = debias * w + (1 - w)
        out.append(last / debias)
    return np.array(out)


@pytest.mark.parametrize("w", [0.0, 0.3, 0.6, 0.95, 0.99])
def test_ema_matches_tensorboard_style_loop(w):
    rng = np.random.default_rng(2)
    y = rng.normal(size=3_000)  # several 256-point blocks of the vectorized recurrence
    y[[3, 40, 41, 400, 255, 256, 2999]] = np.nan
    np.testing.assert_allclose(ema(y, w), _ema_loop(y, w), rtol=1e-12, atol=1e-12, equal_nan=True)


def test_ema_starts_at_the_first_value_not_at_zero():
    assert ema(np.array([5.0, 5.0, 5.0]), 0.9)[0] == pytest.approx(5.0)


def test_bucket_sum_merges_histograms_exactly():
    rng = np.random.default_rng(3)
    steps = np.arange(2_000)
    counts = rng.integers(0, 5, size=(30, 2_000)).astype(float)
    counts[29, 1_234] = 1e6  # a tail at one step
    x, merged = bucket_sum(steps, counts, buckets=100)
    assert merged.shape[1] == len(x) <= 100
    np.testing.assert_allclose(merged.sum(axis=1), counts.sum(axis=1))
    assert merged[29].max() >= 1e6
    same_x, same = bucket_sum(steps[:50], counts[:, :50], buckets=100)
    np.testing.assert_array_equal(same, counts[:, :50])
