"""The fused pass of the objective lens (rldiag/stats/lens_kernel.py): its bucket lookup table against the counted
definition, its fallback to the binary search, and the order check across the pieces of rows that workers take."""

from __future__ import annotations

import math

import numba
import numpy as np
import polars as pl
import pytest

from rldiag.analysis import lens as L
from rldiag.stats import lens_kernel as K
from tests.analysis.test_lens import assert_frames_close, random_tokens, reference


@numba.njit
def _lut_and_counted(lut_counts, lut_edge, base, shift, edges, xs):  # pragma: no cover - compiled
    out = np.empty((xs.size, 2), np.int64)
    for i in range(xs.size):
        out[i, 0] = K._lut_bucket(lut_counts, lut_edge, base, shift, xs[i])
        out[i, 1] = K._bucket(edges, xs[i])
    return out


def _probes(edges: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each edge and its neighbours one and a few ulps away, random values from 0 to well past the last edge,
    and the extremes a ratio exp(x) can take."""
    near = [edges]
    for k in (1, 2, 3):
        up, down = edges.copy(), edges.copy()
        for _ in range(k):
            up, down = np.nextafter(up, np.inf), np.nextafter(down, -np.inf)
        near += [up, down[down >= 0]]
    top = 2 * float(edges.max()) if edges.size else 4.0
    return np.concatenate(
        [*near, rng.uniform(0, top, 20_000), np.exp(rng.normal(0, 3, 20_000)), [0.0, 5e-324, 1e-300, 1e300, np.inf]]
    )


@pytest.mark.parametrize(
    "edges",
    [
        [],
        [1.0],
        [0.8, 1.0, 1.2],
        L._ratio_edges(L.LensParams(), L.OBJECTIVES),  # the defaults: 25 bounds from 0.6 to 3
        [0.0, 0.5, 1.0],  # a bound at 0 (BAPO's lower bound may start there)
        [1.0, 1.0 + 2**-12, 1.0 + 2**-11, 3.0],  # bounds closer than the coarsest cells
        [1e-3, 0.999, 1.001, 1e3],  # bounds many powers of two apart
        [2.0 - 2**-51, 2.0, 2.0 + 2**-50],  # bounds in adjacent cells at a power of two
    ],
)
def test_the_lookup_table_finds_the_counted_bucket(edges):
    e = np.array(edges, dtype=np.float64)
    lut = K.bucket_lut(e)
    if lut is None:  # then the pass uses the binary search, which test_lens_kernel checks
        assert e.size > 1
        return
    xs = _probes(e, np.random.default_rng(len(edges)))
    got = _lut_and_counted(*lut, e, xs)
    np.testing.assert_array_equal(got[:, 0], got[:, 1])
    below = (e[None, :] < xs[:, None]).sum(axis=1)
    on = (e[None, :] == xs[:, None]).sum(axis=1)
    np.testing.assert_array_equal(got[:, 1], 2 * below + on)
    # NaN, which no valid token has, lands above every edge's cell and counts no edge
    assert K._bucket(e, math.nan) == 0


def test_the_lookup_table_is_used_for_the_default_bounds_and_refused_when_it_cannot_be_exact():
    assert K.bucket_lut(np.array(L._ratio_edges(L.LensParams(), L.OBJECTIVES))) is not None
    assert K.bucket_lut(np.array([1.0, 1.0 + 2**-40])) is None  # closer than the finest cells
    assert K.bucket_lut(np.array([1e-300, 1.0])) is None  # too many cells between them
    with pytest.raises(ValueError, match="sorted, distinct and >= 0"):
        K.bucket_lut(np.array([1.0, 0.5]))


def test_without_the_lookup_table_the_binary_search_gives_the_same_results(monkeypatch):
    frame = random_tokens(11, steps=3)
    want = reference(frame, L.LensParams())
    assert_frames_close(L.lens(frame), want)
    monkeypatch.setattr(K, "bucket_lut", lambda edges: None)
    assert_frames_close(L.lens(frame), want)


def test_a_sequence_that_comes_back_in_a_later_piece_of_rows_takes_the_sorted_path(monkeypatch):
    """Each piece of rows is in the recorder's order on its own, but sequence 3 comes back after sequence 5 in
    the next piece: the pieces' spans show it, and the sequence sums come from the rows' sorted order."""
    rng = np.random.default_rng(12)
    n = 10
    parts = []
    for seq, first in ((3, 0), (5, 0), (3, n)):
        old = np.log(rng.uniform(0.05, 1.0, n))
        parts.append(
            pl.DataFrame(
                {
                    "step": np.zeros(n, np.int64),
                    "rank": np.zeros(n, np.int32),
                    "micro": np.zeros(n, np.int32),
                    "seq": np.full(n, seq, np.int64),
                    "pos": np.arange(first, first + n, dtype=np.int32),
                    "logp": np.minimum(old + rng.normal(0, 0.2, n), 0.0),
                    "old_logp": old,
                    "adv": np.full(n, 1.0 if seq == 3 else -0.5),
                    "rollout_logp": old,
                }
            )
        )
    frame = pl.concat(parts)
    want = reference(frame, L.LensParams())
    monkeypatch.setattr(L, "_BLOCK_ROWS", n)
    assert L._blocks(frame.height, 2) == [(0, n), (n, 2 * n), (2 * n, 3 * n)]
    got = L.lens(frame, objectives=["gspo", "ctpo"], threads=2)
    assert_frames_close(got, want.select(got.columns))


def test_pieces_are_cut_between_sequences():
    step = np.array([0, 0, 0, 0, 1, 1, 1, 1], np.int64)
    seq = np.array([1, 1, 2, 2, 2, 2, 3, 3], np.int64)
    got = L._sequence_blocks([(0, 1), (1, 5), (5, 8)], step, seq)
    assert got == [(0, 2), (2, 6), (6, 8)]  # 1 -> 2 (sequence 1 ends), 5 -> 6 (sequence 2 of step 1 ends)
    assert L._sequence_blocks([(0, 3), (3, 8)], step, np.full(8, 7, np.int64)) == [(0, 4), (4, 8)]
    assert L._sequence_blocks([(0, 7), (7, 8)], np.zeros(8, np.int64), np.zeros(8, np.int64)) == [(0, 8)]


def test_the_first_chunk_is_smaller_and_chunks_overlap_without_changing_results(monkeypatch):
    counts = pl.DataFrame({"step": [1, 2, 3, 4, 5, 6], "len": [1, 1, 1, 1, 1, 1]})
    assert L._steps_in_chunks(counts, 4, first_rows=1) == [[1], [2, 3, 4, 5], [6]]
    assert L._steps_in_chunks(counts, 4, 2, first_rows=1) == [[1], [2, 3], [4, 5], [6]]
    frame = random_tokens(13, steps=6)
    want = reference(frame, L.LensParams())
    for lanes in (1, 2):
        monkeypatch.setattr(L, "_LANES", lanes)
        assert_frames_close(L.lens(frame, chunk_rows=50, threads=2), want)


def test_trust_the_batch_pass_skips_rows_without_a_ratio():
    rng = np.random.default_rng(14)
    n = 5_000
    step = np.sort(rng.choice([2, 5, 9, 11], n)).astype(np.int64)
    uniq = np.array([2, 5, 9], np.int64)  # rows of step 11 are not this chunk's
    adv = rng.normal(size=n).astype(np.float32)
    r = np.exp(rng.normal(0, 0.1, n))
    r[rng.random(n) < 0.1] = np.nan  # invalid rows: no ratio (their adv may be anything)
    adv[np.isnan(r) & (rng.random(n) < 0.5)] = np.inf
    ess = np.array([0.99, np.nan, 0.97])
    acc = np.zeros((3, 5))
    K.ttb_pass(step, uniq, adv, r, ess, acc)
    for s, st in enumerate(uniq):
        keep = (step == st) & ~np.isnan(r)
        w = np.minimum(r[keep], ess[s])
        a = adv[keep].astype(np.float64)
        want = [keep.sum(), w.sum(), (w * np.abs(a))[a > 0].sum(), (w * np.abs(a)).sum(), np.abs(a).sum()]
        np.testing.assert_allclose(acc[s], want, rtol=1e-12)


def test_columns_of_several_chunks_are_copied_into_reused_arrays():
    a = pl.concat(
        [pl.DataFrame({"x": np.arange(3, dtype=np.int64)}), pl.DataFrame({"x": np.arange(5, dtype=np.int64)})]
    )
    b = pl.concat(
        [pl.DataFrame({"x": np.arange(2, dtype=np.int64)}), pl.DataFrame({"x": np.arange(4, dtype=np.int64)})]
    )
    assert a["x"].n_chunks() == 2
    buffers = L._Buffers()
    got_a = L._int_column(a, "x", buffers)
    np.testing.assert_array_equal(got_a, [0, 1, 2, 0, 1, 2, 3, 4])
    got_b = L._int_column(b, "x", buffers)  # the same memory, the next chunk's values
    np.testing.assert_array_equal(got_b, [0, 1, 0, 1, 2, 3])
    assert np.shares_memory(got_a, got_b)
    one = pl.DataFrame({"x": np.arange(4, dtype=np.float32)})
    view = L._values(one, ["x"], buffers)[0]
    assert view.dtype == np.float32 and np.shares_memory(view, one["x"].to_numpy())  # one chunk: not copied
    with_null = pl.concat([one, pl.DataFrame({"x": pl.Series([None], dtype=pl.Float32)})])
    np.testing.assert_array_equal(L._values(with_null, ["x"], buffers)[0], [0, 1, 2, 3, np.nan])
