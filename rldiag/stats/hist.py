"""Fixed-edge, log-spaced histograms: mergeable by addition, with a documented quantile error bound.

Magnitudes |x| are binned with 8 bins per octave between 2**-20 (about 9.5e-7) and 2**10 (1024), plus an
underflow bin ``[0, 2**-20)`` and an overflow bin ``[2**10, inf)``. A *signed* histogram mirrors the
magnitude bins for negative values. Because every record uses the same edges, histograms of micro-batches,
ranks and files merge by adding counts, and the merged histogram is exactly the histogram of the union.

**Error bound.** A quantile is reported as the geometric midpoint of the bin holding the exact order statistic
(inverted-CDF definition, numpy ``method="inverted_cdf"``). For values with magnitude in [2**-20, 2**10] the
estimate is within a factor ``2**(1/16)`` (about 4.4%) of the exact quantile. Values in the underflow bin are
reported as ``2**-21`` (absolute error below 1e-6); values in the overflow bin as ``2**10.5``.
"""

from __future__ import annotations

from typing import Any, Final, overload

import numba
import numpy as np

BINS_PER_OCTAVE: Final[int] = 8
MIN_EXP: Final[int] = -20
MAX_EXP: Final[int] = 10
N_MAG: Final[int] = (MAX_EXP - MIN_EXP) * BINS_PER_OCTAVE + 2
"""Magnitude bins: underflow, (MAX_EXP-MIN_EXP)*8 log bins, overflow."""
N_SIGNED: Final[int] = 2 * N_MAG
RELATIVE_ERROR: Final[float] = 2.0 ** (1.0 / (2 * BINS_PER_OCTAVE)) - 1.0
"""Largest relative error of a quantile estimate for magnitudes inside [2**-20, 2**10]."""

_MAG_EDGES = 2.0 ** (np.arange(MIN_EXP * BINS_PER_OCTAVE, MAX_EXP * BINS_PER_OCTAVE + 1) / BINS_PER_OCTAVE)
# Representative value of each magnitude bin: geometric midpoint; underflow and overflow get a fixed value.
_MAG_MID = np.concatenate([[2.0 ** (MIN_EXP - 1)], np.sqrt(_MAG_EDGES[:-1] * _MAG_EDGES[1:]), [2.0 ** (MAX_EXP + 0.5)]])
_SIGNED_MID = np.concatenate([-_MAG_MID[::-1], _MAG_MID])


# Exact binning without a logarithm (used here; the statistics kernel counts the OCTAVE_EDGES below f instead,
# the same bin: tests/stats/test_kernel_primitives.py checks both at every edge and the double below it): for a double
# a = 2**e * f, f in [1, 2), the bin inside the octave is floor(8 * log2 f); the top MANT_BITS bits of f's
# mantissa give it up to one edge (no 1/1024-wide slice of [1, 2) holds two edges), and one comparison with
# the next edge 2**((j+1)/8) settles it.
MANT_BITS: Final[int] = 10
MANT_BIN: Final[np.ndarray] = np.floor(BINS_PER_OCTAVE * np.log2(1.0 + np.arange(2**MANT_BITS) / 2**MANT_BITS)).astype(
    np.int64
)
"""Bin inside the octave of the mantissa slice [1 + i/1024, 1 + (i+1)/1024), up to the edge test."""
OCTAVE_EDGES: Final[np.ndarray] = 2.0 ** (np.arange(BINS_PER_OCTAVE + 2) / BINS_PER_OCTAVE)
"""Edges 2**(j/8) of the bins inside an octave (the doubles nearest them)."""
FIRST_BIN: Final[int] = 1 - MIN_EXP * BINS_PER_OCTAVE
"""Index of a = 2**e * f: ``BINS_PER_OCTAVE * e + j + FIRST_BIN`` (j the bin inside the octave)."""


def mag_index(x: np.ndarray) -> np.ndarray:
    """Magnitude-bin index of |x| (int64), NaN-free input assumed.

    Bin k >= 1 holds [2**((k-1)/8 + MIN_EXP), 2**(k/8 + MIN_EXP)); the edges are exact (no log2 rounding).
    """
    a = np.abs(np.asarray(x, dtype=np.float64))
    bits = a.view(np.int64)
    e = (bits >> 52) - 1023
    j = MANT_BIN[(bits >> (52 - MANT_BITS)) & (2**MANT_BITS - 1)]
    f = ((bits & (2**52 - 1)) | (1023 << 52)).view(np.float64)
    j = j + (f >= OCTAVE_EDGES[j + 1])
    k = BINS_PER_OCTAVE * e + j + FIRST_BIN
    k = np.where(a < _MAG_EDGES[0], 0, k)
    return np.where(a >= _MAG_EDGES[-1], N_MAG - 1, k).astype(np.int64)


def signed_index(x: np.ndarray) -> np.ndarray:
    """Signed-bin index: negatives mirror into [0, N_MAG), non-negatives go to [N_MAG, 2*N_MAG)."""
    m = mag_index(x)
    return np.where(x < 0, N_MAG - 1 - m, N_MAG + m)


@overload
def fold(signed_counts: SparseRows) -> SparseRows: ...
@overload
def fold(signed_counts: np.ndarray) -> np.ndarray: ...
def fold(signed_counts: np.ndarray | SparseRows) -> np.ndarray | SparseRows:
    """Counts of |x| from signed-bin counts ``[..., N_SIGNED]``: negative bin k mirrors positive bin k.

    Sparse rows (:class:`SparseRows`) stay sparse: their bins are mapped when they are read.

    >>> h = np.zeros((1, N_SIGNED)); h[0, signed_index(np.array([-0.5, 0.5, 2.0]))] += 1
    >>> int(fold(h)[0, mag_index(np.array([0.5]))[0]])
    2
    """
    if isinstance(signed_counts, SparseRows):
        return signed_counts.folded()
    h = np.asarray(signed_counts)
    return h[..., N_MAG:] + h[..., :N_MAG][..., ::-1]


def representative(n_bins: int) -> np.ndarray:
    """Value reported for each bin of a histogram with ``n_bins`` bins (magnitude or signed)."""
    if n_bins == N_MAG:
        return _MAG_MID
    if n_bins == N_SIGNED:
        return _SIGNED_MID
    raise ValueError(f"unknown histogram size {n_bins}")


_CUM: list[tuple[np.ndarray, np.ndarray]] = []


def _cumsum(counts: np.ndarray) -> np.ndarray:
    """Row cumulative sums, remembered for the last few arrays (several quantiles of one histogram)."""
    for arr, cum in _CUM:
        if arr is counts:
            return cum
    cum = np.cumsum(counts, axis=1)
    _CUM.append((counts, cum))
    del _CUM[:-4]
    return cum


def clear_cache() -> None:
    """Forget remembered cumulative sums (called once a set of metrics is finalized)."""
    _CUM.clear()


def quantiles(counts: np.ndarray | SparseRows, q: float) -> np.ndarray:
    """Quantile ``q`` of each row of a 2-D count matrix (NaN for empty rows).

    Inverted-CDF definition: the smallest bin whose cumulative count reaches ``q * n`` (at least 1). Sparse
    rows (:class:`SparseRows`) are read in one compiled pass over their entries, without a dense matrix; the
    result is the same, bit for bit (counts are integers, so every partial sum is exact).
    """
    if isinstance(counts, SparseRows):
        return counts.quantiles(q)
    counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    cum = _cumsum(counts)
    total = cum[:, -1]
    target = np.maximum(np.ceil(q * total - 1e-9), 1.0)
    idx = (cum < target[:, None]).sum(axis=1)
    idx = np.minimum(idx, counts.shape[1] - 1)
    out = representative(counts.shape[1])[idx]
    return np.where(total > 0, out, np.nan)


_ROW_BLOCK: Final[int] = 4096
"""Rows of a histogram matrix that :func:`hill_alpha` takes at a time: its dozen temporaries of a block (about
16 MB each) are reused from one block to the next, where those of 10,000 steps (39 MB each) were fresh memory,
which a process touches for the first time at a cost (0.34 s against 0.08 s for the first call on 10,000 steps
here; each row's arithmetic is the same, so are the bits)."""


def hill_alpha(signed_counts: np.ndarray, min_tail: int = 20) -> np.ndarray:
    """Hill tail index of r = exp(lr) from a signed histogram of lr, one value per row.

    `ratio/tail_alpha` (docs/metrics.md): with ln X = lr for the tokens with r > 1 (n_tail of them) and
    k = floor(sqrt(n_tail)) clamped to [10, n_tail - 1], xi = mean of the k largest lr - the (k+1)-th largest,
    alpha = 1/xi; NaN when fewer than ``min_tail`` tokens have r > 1. Order statistics are read from the
    histogram with the values of a bin spread evenly over it (each bin spans a factor 2**(1/8) in lr), so the
    estimate is approximate: the tests bound its error against the exact estimator on heavy-tailed samples.
    Tokens with |lr| < 2**-20 (the underflow bin) are not counted in the tail.
    """
    signed_counts = np.atleast_2d(np.asarray(signed_counts, dtype=np.float64))
    if signed_counts.shape[0] > _ROW_BLOCK:
        rows = signed_counts.shape[0]
        return np.concatenate(
            [_hill_alpha(signed_counts[i : i + _ROW_BLOCK], min_tail) for i in range(0, rows, _ROW_BLOCK)]
        )
    return _hill_alpha(signed_counts, min_tail)


def _hill_alpha(signed_counts: np.ndarray, min_tail: int) -> np.ndarray:
    # positive side, log bins only (skip underflow), from the top down
    pos = signed_counts[:, N_MAG + 1 :][:, ::-1]
    hi = np.concatenate([_MAG_EDGES[1:], [2.0 ** (MAX_EXP + 1)]])[::-1]
    lo = np.concatenate([_MAG_EDGES[:-1], [2.0**MAX_EXP]])[::-1]
    width = hi - lo
    n_tail = pos.sum(axis=1)
    out = np.full(pos.shape[0], np.nan)
    ok = n_tail >= min_tail
    if not ok.any():
        return out
    pos = pos[ok]
    n_tail = n_tail[ok]
    k = np.clip(np.floor(np.sqrt(n_tail)), 10, n_tail - 1)
    cum = np.cumsum(pos, axis=1)
    before = cum - pos  # counts above each bin
    # the top k: whole bins fully above rank k, plus m values of the bin holding rank k
    take = np.clip(k[:, None] - before, 0, pos)  # values taken from each bin
    c = np.where(pos > 0, pos, 1.0)
    # sum of the m largest of c values spread evenly in [lo, hi]: m*hi - width/c * m**2/2
    top_sum = (take * hi - width / c * take**2 / 2.0).sum(axis=1)
    # (k+1)-th largest: bin j holding rank k+1, within-bin rank t = k+1 - before
    j = (cum < (k + 1)[:, None]).sum(axis=1)
    j = np.minimum(j, pos.shape[1] - 1)
    rows = np.arange(pos.shape[0])
    t = (k + 1) - before[rows, j]
    x_k1 = hi[j] - (t - 0.5) / c[rows, j] * width[j]
    xi = top_sum / k - x_k1
    with np.errstate(divide="ignore"):
        out[ok] = np.where(xi > 0, 1.0 / xi, np.inf)
    return out


def sparse(idx: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Count bin indices and return the non-empty bins as (uint16 indices, uint32 counts)."""
    c = np.bincount(idx, minlength=n_bins)
    nz = np.flatnonzero(c)
    return nz.astype(np.uint16), c[nz].astype(np.uint32)


def densify(
    row_group: np.ndarray,
    n_groups: int,
    lengths: np.ndarray,
    idx: np.ndarray,
    cnt: np.ndarray,
    n_bins: int,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Merge sparse histograms of many rows into one dense row per group.

    ``row_group[i]`` is the group of row i, whose histogram is the slice of ``idx``/``cnt`` of length
    ``lengths[i]`` (Arrow list layout). Returns a float64 ``[n_groups, n_bins]`` matrix of summed counts (added
    into ``out`` when given: the rows of a table can be densified chunk by chunk, without joining the chunks).

    The inputs come from files, so nothing in them is trusted: a bin index outside ``[0, n_bins)``, a group
    outside ``[0, n_groups)``, a negative length or lengths that do not add up to the entries raise
    ``ValueError`` before anything is written (the compiled loop does no bounds checks of its own).
    """
    if out is None:
        out = np.zeros((n_groups, n_bins))
    elif out.shape != (n_groups, n_bins) or out.dtype != np.float64 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float64 array of shape {(n_groups, n_bins)}")
    row_group, lengths, idx, cnt = _checked_sparse(row_group, n_groups, lengths, idx, cnt, n_bins)
    _densify(row_group, lengths, idx, cnt, out)
    return out


def _checked_sparse(
    row_group: np.ndarray, n_groups: int, lengths: np.ndarray, idx: np.ndarray, cnt: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sparse inputs of :func:`densify` and :func:`merge_sparse` as contiguous arrays of the compiled
    loops' types, after checking every index and length (``ValueError`` naming what is damaged)."""
    idx = np.ascontiguousarray(idx)
    if idx.dtype.kind not in "iu":  # an empty column comes back as float
        idx = idx.astype(np.int64)
    cnt = np.ascontiguousarray(cnt)
    row_group = np.ascontiguousarray(row_group, dtype=np.int64)
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    bad = _check_sparse(row_group, n_groups, lengths, idx, cnt.size, n_bins)
    if bad:
        raise ValueError(f"damaged sparse histogram: {_SPARSE_ERRORS[bad]} (bins {n_bins}, groups {n_groups})")
    return row_group, lengths, idx, cnt


def merge_sparse(
    row_group: np.ndarray, n_groups: int, lengths: np.ndarray, idx: np.ndarray, cnt: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge sparse histograms of many rows into one *sparse* histogram per group, without a dense matrix.

    Inputs as for :func:`densify` (and checked the same way). Returns ``(lengths, bins, counts)`` of the merged
    rows in the Arrow list layout: per group its non-empty bins in ascending order (int64) and their summed
    counts (float64, exact integers) -- the bins and counts that :func:`densify` followed by
    :func:`sparse_row` gives, without the ``[n_groups, n_bins]`` matrix (100,000 steps x 484 bins is 387 MB
    per histogram, most of a first open's time in page faults).
    """
    row_group, lengths, idx, cnt = _checked_sparse(row_group, n_groups, lengths, idx, cnt, n_bins)
    order = np.argsort(row_group, kind="stable")
    starts = np.zeros(lengths.size, dtype=np.int64)
    if lengths.size:
        np.cumsum(lengths[:-1], out=starts[1:])
    out_len = np.zeros(n_groups, dtype=np.int64)
    out_bin = np.empty(min(idx.size, n_groups * n_bins), dtype=np.int64)
    out_cnt = np.empty(out_bin.size)
    k = _merge_sparse(order, row_group, starts, lengths, idx, cnt, n_bins, out_len, out_bin, out_cnt)
    return out_len, out_bin[:k], out_cnt[:k]


@numba.njit(nogil=True, cache=True)
def _merge_sparse(order, row_group, starts, lengths, idx, cnt, n_bins, out_len, out_bin, out_cnt):  # pragma: no cover
    # rows in group order (stable); each group's entries added into one scratch row, whose non-zero bins are
    # emitted in ascending order and reset; the caller has checked every index with _check_sparse
    scratch = np.zeros(n_bins)
    k = 0
    r = 0
    for g in range(out_len.size):
        if r < order.size and row_group[order[r]] == g and (r + 1 == order.size or row_group[order[r + 1]] != g):
            # one row in the group whose bins ascend strictly (as written): its non-zero entries are the result
            i = order[r]
            s0, s1 = starts[i], starts[i] + lengths[i]
            ascending = True
            for e in range(s0 + 1, s1):
                if idx[e] <= idx[e - 1]:
                    ascending = False
                    break
            if ascending:
                n = 0
                for e in range(s0, s1):
                    if cnt[e] != 0:
                        out_bin[k] = idx[e]
                        out_cnt[k] = 0.0 + cnt[e]
                        k += 1
                        n += 1
                out_len[g] = n
                r += 1
                continue
        while r < order.size and row_group[order[r]] == g:
            i = order[r]
            for e in range(starts[i], starts[i] + lengths[i]):
                scratch[idx[e]] += cnt[e]
            r += 1
        n = 0
        for b in range(n_bins):
            v = scratch[b]
            if v != 0.0:
                out_bin[k] = b
                out_cnt[k] = v
                scratch[b] = 0.0
                k += 1
                n += 1
        out_len[g] = n
    return k


_SPARSE_ERRORS = {
    1: "row and length counts differ",
    2: "a row's group is out of range",
    3: "a negative list length",
    4: "list lengths do not add up to the entries (index and count lists differ)",
    5: "a bin index is out of range",
}


@numba.njit(nogil=True, cache=True)
def _check_sparse(row_group, n_groups, lengths, idx, n_cnt, n_bins):  # pragma: no cover - compiled
    """0 when every write of :func:`_densify` lands inside ``out``, else the code of the first fault."""
    if row_group.size != lengths.size:
        return 1
    total = 0
    for i in range(row_group.size):
        g = row_group[i]
        if g < 0 or g >= n_groups:
            return 2
        if lengths[i] < 0:
            return 3
        total += lengths[i]
    if total != idx.size or total != n_cnt:
        return 4
    for k in range(idx.size):
        if idx[k] < 0 or idx[k] >= n_bins:
            return 5
    return 0


@numba.njit(nogil=True, cache=True)
def _densify(row_group, lengths, idx, cnt, out):  # pragma: no cover - compiled
    # one pass, no temporaries (a numpy version built three arrays as long as all the entries: 3x slower);
    # the caller has checked every index with _check_sparse
    k = 0
    for i in range(row_group.size):
        g = row_group[i]
        for _ in range(lengths[i]):
            out[g, idx[k]] += cnt[k]
            k += 1


def sparse_row(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-empty bins of a dense count row as (uint16 indices, uint32 counts)."""
    nz = np.flatnonzero(counts)
    return nz.astype(np.uint16), counts[nz].astype(np.uint32)


class SparseRows:
    """Histograms of many rows kept as their non-empty bins (the Arrow list layout of the statistics table).

    What :func:`rldiag.metrics.aggregate.merge` returns for a table that already holds one row per group (the
    compacted statistics of a run): a quantile is then read from each row's entries in one compiled pass
    (:meth:`quantiles`) instead of building a dense ``[rows, bins]`` matrix (100,000 steps x 484 bins is
    387 MB). Anything else that needs the counts gets the dense matrix (``np.asarray(rows)``, computed once).

    The entries are checked when the object is built, exactly as :func:`densify` checks them (they come from
    files): a bin index outside ``[0, n_bins)`` or lengths that do not add up raise ``ValueError``.
    """

    def __init__(self, lengths: np.ndarray, idx: np.ndarray, cnt: np.ndarray, n_bins: int, *, fold: bool = False):
        self.lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        idx = np.ascontiguousarray(idx)
        self.idx = idx if idx.dtype.kind in "iu" else idx.astype(np.int64)
        self.cnt = np.ascontiguousarray(cnt)
        self.stored_bins = int(n_bins)
        self.fold = bool(fold)
        if fold and n_bins != N_SIGNED:
            raise ValueError(f"only a signed histogram ({N_SIGNED} bins) folds, not {n_bins} bins")
        rows = np.arange(self.lengths.size, dtype=np.int64)
        bad = _check_sparse(rows, self.lengths.size, self.lengths, self.idx, self.cnt.size, self.stored_bins)
        if bad:
            raise ValueError(f"damaged sparse histogram: {_SPARSE_ERRORS[bad]} (bins {n_bins})")
        self._dense: np.ndarray | None = None

    @property
    def n_bins(self) -> int:
        """Bins of the histogram it stands for (:data:`N_MAG` once folded)."""
        return N_MAG if self.fold else self.stored_bins

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.lengths.size), self.n_bins)

    def folded(self) -> SparseRows:
        """The histograms of |x| (see :func:`fold`), still sparse."""
        out = SparseRows.__new__(SparseRows)
        out.__dict__.update(self.__dict__)
        out.fold, out._dense = True, None
        if self.stored_bins != N_SIGNED or self.fold:
            raise ValueError(f"only a signed histogram ({N_SIGNED} bins) folds")
        return out

    def dense(self) -> np.ndarray:
        """The float64 ``[rows, bins]`` count matrix (computed once)."""
        if self._dense is None:
            rows = np.arange(self.lengths.size, dtype=np.int64)
            d = np.zeros((self.lengths.size, self.stored_bins))
            _densify(rows, self.lengths, self.idx, self.cnt, d)
            self._dense = fold(d) if self.fold else d
        assert self._dense is not None
        return self._dense

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        d = self.dense()
        return d if dtype is None else d.astype(dtype, copy=False)

    def quantiles(self, q: float) -> np.ndarray:
        """Quantile ``q`` of each row, as :func:`quantiles` gives it for the dense matrix."""
        if self._dense is not None:
            return quantiles(self._dense, q)
        out = np.empty(self.lengths.size)
        _sparse_quantiles(
            self.lengths, self.idx, self.cnt, self.stored_bins, self.fold, float(q), representative(self.n_bins), out
        )
        return out


@numba.njit(nogil=True, cache=True)
def _sparse_quantiles(lengths, idx, cnt, n_bins, fold, q, rep, out):  # pragma: no cover - compiled
    # per row: add its entries into one scratch row, then the steps of quantiles() on it (a sequential cumulative
    # sum, the same target, the first bin reaching it); entries were checked by SparseRows
    nb = rep.size
    half = n_bins // 2
    scratch = np.zeros(nb)
    k = 0
    for i in range(lengths.size):
        start = k
        for _ in range(lengths[i]):
            b = idx[k]
            if fold:
                b = b - half if b >= half else half - 1 - b
            scratch[b] += cnt[k]
            k += 1
        total = 0.0
        for b in range(nb):
            total += scratch[b]
        if total > 0:
            target = max(np.ceil(q * total - 1e-9), 1.0)
            cum = 0.0
            j = nb - 1
            for b in range(nb):
                cum += scratch[b]
                if cum >= target:
                    j = b
                    break
            out[i] = rep[j]
        else:
            out[i] = np.nan
        for kk in range(start, k):  # reset only what this row touched
            b = idx[kk]
            if fold:
                b = b - half if b >= half else half - 1 - b
            scratch[b] = 0.0
