"""Server-side downsampling that keeps spikes, and EMA smoothing.

A browser draws a few thousand points per trace comfortably; a long run has more steps than that. Random or
stride sampling hides exactly what a diagnostics tool must show (the one step where the ratio blew up), so
the series is cut into contiguous buckets of equal step width and each bucket reports its **min, max and
mean**: the min/max envelope carries every spike, the mean the trend. The first and the last point are kept
exactly, so the line starts and ends where the data does and a live run's newest step is always visible.
NaN values (a metric whose inputs are missing at some steps) are ignored inside a bucket; an all-NaN bucket
yields NaN, which plotly draws as a gap.

Example::

    >>> import numpy as np
    >>> x = np.arange(10_000); y = np.zeros(10_000); y[4321] = 9.0
    >>> env = downsample(x, y, buckets=100)
    >>> float(env.hi.max()), len(env.x) <= 102
    (9.0, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_BUCKETS = 600
"""Buckets per trace: about one per two pixels of a full-width chart."""


@dataclass(frozen=True)
class Envelope:
    """A downsampled series: one row per bucket (plus the exact first and last points).

    ``lo`` and ``hi`` equal ``mean`` where a row holds a single point. ``exact`` is True when no
    aggregation happened (the series had at most ``buckets`` points in range).
    """

    x: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    exact: bool


def _as_float(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def downsample(
    x: np.ndarray,
    y: np.ndarray,
    *,
    buckets: int = DEFAULT_BUCKETS,
    x_range: tuple[float, float] | None = None,
) -> Envelope:
    """Min/max/mean envelope of ``y`` over ``x`` in at most ``buckets`` (+2) rows.

    ``x`` must be sorted ascending (steps). With ``x_range`` only points inside it are aggregated (zoom);
    the nearest point on each side outside the range is kept too, so the line runs to the plot edges.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    xs, ys = _as_float(x), _as_float(y)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-d of the same length, got {xs.shape} and {ys.shape}")
    if x_range is not None:
        lo_x, hi_x = sorted(float(v) for v in x_range)
        start = max(int(np.searchsorted(xs, lo_x, side="left")) - 1, 0)
        stop = min(int(np.searchsorted(xs, hi_x, side="right")) + 1, len(xs))
        xs, ys = xs[start:stop], ys[start:stop]
    n = len(xs)
    if n <= buckets + 2:
        return Envelope(xs, ys, ys.copy(), ys.copy(), exact=True)

    # Interior points (first and last are kept exactly) go into buckets of equal x width.
    ix, iy = xs[1:-1], ys[1:-1]
    edges = np.linspace(ix[0], ix[-1], buckets + 1)
    which = np.clip(np.searchsorted(edges, ix, side="right") - 1, 0, buckets - 1)
    starts = np.flatnonzero(np.r_[True, which[1:] != which[:-1]])  # x sorted -> buckets are contiguous
    finite = np.isfinite(iy)
    filled = np.where(finite, iy, 0.0)
    counts = np.add.reduceat(finite.astype(np.int64), starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.add.reduceat(filled, starts) / counts
        bx = np.add.reduceat(ix, starts) / np.diff(np.r_[starts, len(ix)])
    lo = np.fmin.reduceat(np.where(finite, iy, np.nan), starts)
    hi = np.fmax.reduceat(np.where(finite, iy, np.nan), starts)
    mean = np.where(counts > 0, mean, np.nan)
    return Envelope(
        x=np.r_[xs[0], bx, xs[-1]],
        mean=np.r_[ys[0], mean, ys[-1]],
        lo=np.r_[ys[0], lo, ys[-1]],
        hi=np.r_[ys[0], hi, ys[-1]],
        exact=False,
    )


def ema(y: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average, as TensorBoard's smoothing slider computes it.

    ``weight`` in [0, 1): 0 returns ``y`` unchanged. NaN points stay NaN and do not reset the average.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    ys = _as_float(y)
    if weight == 0.0 or len(ys) == 0:
        return ys.copy()
    out = np.full_like(ys, np.nan)
    finite = np.flatnonzero(np.isfinite(ys))
    values = ys[finite]
    # last_k = w*last_{k-1} + (1-w)*v_k over the finite points; dividing by 1 - w^(k+1) removes the bias
    # toward the zero the average starts from.
    out[finite] = _ema_recurrence(values, weight) / (1.0 - weight ** np.arange(1, len(values) + 1))
    return out


_BLOCK = 256


def _ema_recurrence(values: np.ndarray, w: float) -> np.ndarray:
    """``last_k = w*last_{k-1} + (1-w)*v_k`` (``last_-1 = 0``) in blocks of 256: within a block it is a
    lower-triangular matrix of powers ``w^(k-j)`` (all <= 1, so it is stable), blocks chain through the
    carry. Pure numpy: scipy.signal.lfilter would do it but costs 1.6 s to import on the first live tick."""
    n = len(values)
    if n == 0:
        return values.copy()
    k = np.arange(min(_BLOCK, n))
    lag = k[:, None] - k[None, :]
    powers = np.where(lag >= 0, w ** np.maximum(lag, 0), 0.0)
    carry_w = w ** (k + 1)
    out = np.empty(n)
    carry = 0.0
    for start in range(0, n, _BLOCK):
        block = values[start : start + _BLOCK]
        m = len(block)
        res = (1.0 - w) * (powers[:m, :m] @ block) + carry * carry_w[:m]
        out[start : start + m] = res
        carry = float(res[-1])
    return out


def bucket_sum(x: np.ndarray, counts: np.ndarray, *, buckets: int = DEFAULT_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """Merge the columns of a histogram-per-step matrix ``counts`` (bins x steps) into at most ``buckets``.

    Histograms merge by addition, so a bucket's column is exactly the histogram of all its steps: a tail
    that appears at one step is still in the merged column. Returns (first step of each bucket, counts).
    """
    xs = _as_float(x)
    counts = np.asarray(counts, dtype=np.float64)
    if len(xs) <= buckets:
        return xs, counts
    edges = np.linspace(xs[0], xs[-1], buckets + 1)
    which = np.clip(np.searchsorted(edges, xs, side="right") - 1, 0, buckets - 1)
    starts = np.flatnonzero(np.r_[True, which[1:] != which[:-1]])
    return xs[starts], np.add.reduceat(counts, starts, axis=1)
