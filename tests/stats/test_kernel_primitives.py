"""The kernel's hand-written numerical primitives against numpy: binning, expm1, top-k sum."""

import numba
import numpy as np
import pytest

from rldiag.stats import hist, kernel


@numba.njit
def _apply(x, which):  # pragma: no cover - compiled
    """kernel._mag (0), kernel._signed (1) or kernel._expm1 (2) of each x, as compiled into the kernel."""
    out = np.empty(x.size)
    for i in range(x.size):
        out[i] = kernel._mag(x[i]) if which == 0 else kernel._signed(x[i]) if which == 1 else kernel._expm1(x[i])
    return out


def _mag_all(x):
    return _apply(x, 0).astype(np.int64)


def _signed_all(x):
    return _apply(x, 1).astype(np.int64)


def _expm1_all(x):
    return _apply(x, 2)


def test_bin_edges_are_exact_and_kernel_matches_numpy() -> None:
    k = np.arange(hist.MIN_EXP * hist.BINS_PER_OCTAVE, hist.MAX_EXP * hist.BINS_PER_OCTAVE + 1)
    edges = 2.0 ** (k / hist.BINS_PER_OCTAVE)
    # an edge opens its bin; the double just below it is in the bin before
    assert np.array_equal(hist.mag_index(edges), np.arange(1, edges.size + 1))
    assert np.array_equal(hist.mag_index(np.nextafter(edges, 0)), np.arange(0, edges.size))
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_t(2, 200_000) * 10.0 ** rng.uniform(-9, 4, 200_000),
            edges,
            -edges,
            np.nextafter(edges, 0),
            [0.0, -0.0, np.inf, -np.inf, 1e-300, 1e300],
        ]
    )
    assert np.array_equal(_mag_all(x), hist.mag_index(x))
    assert np.array_equal(_signed_all(x), hist.signed_index(x))
    # away from the edges the bins are floor(8 log2 |x|) shifted, as documented
    inner = x[(np.abs(x) >= 2.0**-20) & (np.abs(x) < 2.0**10)]
    frac = np.log2(np.abs(inner)) * hist.BINS_PER_OCTAVE
    far = np.abs(frac - np.round(frac)) > 1e-9
    want = np.floor(frac[far]) - hist.MIN_EXP * hist.BINS_PER_OCTAVE + 1
    assert np.array_equal(hist.mag_index(inner[far]), want.astype(np.int64))


@pytest.mark.parametrize("scale", [1e-12, 1e-6, 1e-3, 0.0027, 0.01, 0.3, 1.0, 30.0, 700.0])
def test_expm1_relative_error(scale: float) -> None:
    rng = np.random.default_rng(int(scale * 1e6) % 2**31)
    x = rng.uniform(-scale, scale, 100_000)
    exact = np.expm1(x)
    rel = np.abs(_expm1_all(x) - exact) / np.abs(exact)
    assert rel.max() < 1e-13


def test_expm1_out_of_range_and_special() -> None:
    x = np.array([0.0, 750.0, -750.0, np.inf, -np.inf, np.nan])
    got = _expm1_all(x)
    assert got[0] == 0.0 and got[1] == np.inf and got[2] == -1.0 and got[3] == np.inf and got[4] == -1.0
    assert np.isnan(got[5])


@pytest.mark.parametrize("m,k", [(0, 1), (5, 10), (10, 10), (1000, 1), (1000, 7), (1000, 999), (50_000, 100)])
def test_top_positive_sum_equals_sorted_sum(m: int, k: int) -> None:
    rng = np.random.default_rng(m + k)
    vals = rng.exponential(1.0, m)
    vals[::7] = 1.0  # ties
    want = np.sort(vals)[::-1][:k].sum()
    assert kernel._top_positive_sum(vals, m, k) == pytest.approx(want, rel=1e-12)


def test_statistics_do_not_depend_on_memory_alignment() -> None:
    """The same tokens at other addresses give bit-identical statistics (vectorized sums keep a fixed order)."""
    from rldiag.config import RecorderConfig

    rng = np.random.default_rng(3)
    n_seq, T = 37, 29
    n = n_seq * T
    lp = -rng.exponential(1.0, n)
    cols = {
        "logp": lp,
        "old_logp": lp + rng.normal(0, 0.2, n),
        "adv": np.repeat(rng.normal(size=n_seq), T),
        "entropy": rng.exponential(1.0, n),
        "rollout_logp": lp + rng.normal(0, 0.1, n),
        "ref_logp": lp + rng.normal(0, 0.3, n),
    }
    cols["old_logp"] = np.minimum(cols["old_logp"], 0)
    cols["rollout_logp"] = np.minimum(cols["rollout_logp"], 0)
    cols["logp"][::17] = np.nan

    def at_offset(off: int) -> kernel.BatchStats:
        placed = {}
        for k, v in cols.items():
            buf = np.empty(n + 32, np.float32)
            buf[off : off + n] = v
            placed[k] = buf[off : off + n]
        tb = kernel.TokenBatch(
            rec_off=np.array([0, 20, n_seq]),
            seq_off=np.arange(0, n + 1, T),
            steps=np.array([0, 0]),
            pos=np.tile(np.arange(T), n_seq),
            **placed,
        )
        return kernel.compute(tb, RecorderConfig())

    ref = at_offset(0)
    for off in range(1, 16):
        got = at_offset(off)
        assert np.array_equal(got.scalars, ref.scalars, equal_nan=True), off
        assert all(np.array_equal(got.hists[k], ref.hists[k]) for k in ref.hists)
        assert all(np.array_equal(got.vectors[k], ref.vectors[k]) for k in ref.vectors)
