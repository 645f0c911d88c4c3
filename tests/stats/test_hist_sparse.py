"""hist.SparseRows: quantiles read from the sparse entries are the dense path's, bit for bit."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rldiag.metrics import aggregate
from rldiag.stats import hist


def _rows(rng: np.random.Generator, n_rows: int, n_bins: int, *, empty: float = 0.1):
    lengths, idx, cnt = [], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for _ in range(n_rows):
        k = 0 if rng.random() < empty else int(rng.integers(1, min(40, n_bins)))
        bins = np.sort(rng.choice(n_bins, size=k, replace=False))
        lengths.append(k)
        idx.append(bins)
        cnt.append(rng.integers(1, 2**20, size=k))
    return (
        np.array(lengths, np.int64),
        np.concatenate(idx).astype(np.uint16),
        np.concatenate(cnt).astype(np.uint32),
    )


def _dense(lengths, idx, cnt, n_bins):
    return hist.densify(np.arange(lengths.size), lengths.size, lengths, idx, cnt, n_bins)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_rows=st.integers(0, 30), signed=st.booleans())
def test_sparse_quantiles_equal_dense_bit_for_bit(seed: int, n_rows: int, signed: bool) -> None:
    rng = np.random.default_rng(seed)
    nb = hist.N_SIGNED if signed else hist.N_MAG
    lengths, idx, cnt = _rows(rng, n_rows, nb)
    dense = _dense(lengths, idx, cnt, nb)
    sparse = hist.SparseRows(lengths, idx, cnt, nb)
    for q in (0.0, 1e-6, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0):
        np.testing.assert_array_equal(hist.quantiles(sparse, q), hist.quantiles(dense, q))
        if signed:
            got = hist.quantiles(hist.fold(sparse), q)
            np.testing.assert_array_equal(got, hist.quantiles(hist.fold(dense), q))
    np.testing.assert_array_equal(np.asarray(sparse), dense)
    if signed:
        np.testing.assert_array_equal(np.asarray(hist.fold(sparse)), hist.fold(dense))
        np.testing.assert_array_equal(hist.hill_alpha(sparse), hist.hill_alpha(dense))


def test_sparse_rows_with_repeated_bins_in_a_row() -> None:
    """Entries of one row need not be unique or sorted: they add up like densify's."""
    lengths = np.array([3, 2])
    idx = np.array([5, 1, 5, 7, 0], np.uint16)
    cnt = np.array([2, 1, 3, 1, 1], np.uint32)
    dense = _dense(lengths, idx, cnt, hist.N_MAG)
    for q in (0.1, 0.5, 0.9):
        np.testing.assert_array_equal(
            hist.SparseRows(lengths, idx, cnt, hist.N_MAG).quantiles(q), hist.quantiles(dense, q)
        )


@pytest.mark.parametrize(
    ("lengths", "idx", "message"),
    [
        (np.array([1, 1]), np.array([0, hist.N_MAG], np.int64), "bin index is out of range"),
        (np.array([1, 1]), np.array([0, -1], np.int64), "bin index is out of range"),
        (np.array([1, 2]), np.array([0, 1], np.int64), "do not add up"),
        (np.array([-1, 3]), np.array([0, 1], np.int64), "negative list length"),
    ],
)
def test_damaged_entries_are_refused_before_any_read(lengths, idx, message) -> None:
    with pytest.raises(ValueError, match=message):
        hist.SparseRows(lengths, idx, np.ones(idx.size, np.uint32), hist.N_MAG)


def test_merge_gives_sparse_rows_only_for_one_row_per_group() -> None:
    """aggregate.merge(..., sparse_hists=True): sparse for a compacted table, dense when rows merge; the metrics
    are the same either way."""
    from rldiag.metrics.registry import REGISTRY, needed_stats
    from rldiag.stats.table import STATS_SCHEMA

    rng = np.random.default_rng(3)
    n = 12
    cols = {}
    for f in STATS_SCHEMA:
        if f.name in ("step", "rank", "micro"):
            cols[f.name] = pa.array(np.arange(n) // (2 if f.name == "step" else 1) % 100, f.type)
        elif pa.types.is_list(f.type):
            cols[f.name] = pa.array([[] for _ in range(n)], f.type)
        else:
            cols[f.name] = pa.array(rng.integers(1, 50, n).astype(float), f.type)
    from rldiag.stats.kernel import HISTS

    for name, nb in HISTS.items():
        lengths, idx, cnt = _rows(rng, n, nb, empty=0.0)
        off = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        cols[f"{name}.idx"] = pa.ListArray.from_arrays(off, pa.array(idx))
        cols[f"{name}.cnt"] = pa.ListArray.from_arrays(off, pa.array(cnt))
    table = pa.table(cols, schema=STATS_SCHEMA)
    compacted = aggregate.compact(table)
    names = list(REGISTRY)
    sparse = aggregate.merge(compacted, stats=needed_stats(names), sparse_hists=True)
    dense = aggregate.merge(compacted, stats=needed_stats(names))
    assert isinstance(sparse.stats["h_lr"], hist.SparseRows) and isinstance(dense.stats["h_lr"], np.ndarray)
    assert isinstance(aggregate.merge(table, sparse_hists=True).stats["h_lr"], np.ndarray)  # 2 rows per step
    assert aggregate.finalize(sparse, names).equals(aggregate.finalize(dense, names))
    assert aggregate.finalize(sparse, names).equals(aggregate.metrics_of(table, names=names))


def test_merge_of_a_table_of_many_chunks_densifies_chunk_by_chunk() -> None:
    """A table concatenated from many files (many chunks) merges to the same statistics as the same table in one
    chunk, and a damaged chunk is refused like a damaged table."""
    from rldiag.stats.kernel import HISTS
    from rldiag.stats.table import STATS_SCHEMA

    rng = np.random.default_rng(5)
    parts = []
    for k in range(4):
        n = 6
        cols = {}
        for f in STATS_SCHEMA:
            if f.name == "step":
                cols[f.name] = pa.array(rng.integers(0, 5, n), f.type)
            elif f.name in ("rank", "micro"):
                cols[f.name] = pa.array(np.full(n, k), f.type)
            elif pa.types.is_list(f.type):
                cols[f.name] = pa.array([[] for _ in range(n)], f.type)
            else:
                cols[f.name] = pa.array(rng.integers(1, 50, n).astype(float), f.type)
        for name, nb in HISTS.items():
            lengths, idx, cnt = _rows(rng, n, nb)
            off = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
            cols[f"{name}.idx"] = pa.ListArray.from_arrays(off, pa.array(idx))
            cols[f"{name}.cnt"] = pa.ListArray.from_arrays(off, pa.array(cnt))
        parts.append(pa.table(cols, schema=STATS_SCHEMA))
    chunked = pa.concat_tables(parts)
    assert chunked.column("h_lr.idx").num_chunks == 4
    a, b = aggregate.merge(chunked), aggregate.merge(chunked.combine_chunks())
    for name in HISTS:
        np.testing.assert_array_equal(a.stats[name], b.stats[name])
    bad = parts[2].to_pydict()
    bad["h_ent.idx"][0] = [*bad["h_ent.idx"][0], hist.N_MAG]
    bad["h_ent.cnt"][0] = [*bad["h_ent.cnt"][0], 1]
    damaged = pa.concat_tables([parts[0], pa.table(bad, schema=STATS_SCHEMA), parts[3]])
    with pytest.raises(ValueError, match="bin index is out of range"):
        aggregate.merge(damaged, stats={"h_ent"})


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_rows=st.integers(0, 40), n_groups=st.integers(1, 8))
def test_merge_sparse_equals_densify_then_nonzero(seed: int, n_rows: int, n_groups: int) -> None:
    """The sparse merge of compact() gives, per group, the non-empty bins of the dense merge in ascending order
    and their counts, exactly; rows of a group may be anywhere (several files)."""
    rng = np.random.default_rng(seed)
    nb = hist.N_SIGNED
    lengths, idx, cnt = _rows(rng, n_rows, nb, empty=0.2)
    groups = rng.integers(0, n_groups, n_rows)
    dense = hist.densify(groups, n_groups, lengths, idx, cnt, nb)
    n, bins, counts = hist.merge_sparse(groups, n_groups, lengths, idx, cnt, nb)
    rows, cols = np.nonzero(dense)
    np.testing.assert_array_equal(n, np.bincount(rows, minlength=n_groups))
    np.testing.assert_array_equal(bins, cols)
    np.testing.assert_array_equal(counts, dense[rows, cols])


def test_merge_sparse_refuses_damaged_entries() -> None:
    with pytest.raises(ValueError, match="bin index is out of range"):
        hist.merge_sparse(np.zeros(1), 1, np.array([1]), np.array([hist.N_MAG]), np.ones(1, np.uint32), hist.N_MAG)
    with pytest.raises(ValueError, match="group is out of range"):
        hist.merge_sparse(np.array([3]), 1, np.array([1]), np.array([0]), np.ones(1, np.uint32), hist.N_MAG)


def _dense_compact(table: pa.Table) -> pa.Table:
    """compact() as it was before the sparse merge: densify every histogram, then take its non-empty bins."""
    from rldiag.stats.kernel import HISTS, SCALARS, STATS, VECTORS, BatchStats
    from rldiag.stats.table import to_table

    merged = aggregate.merge(table, by=("step",), stats=set(STATS), keep_sets=True)
    g = merged.n_groups
    scalars = np.stack([merged.stats[n] for n in SCALARS], axis=1) if g else np.zeros((0, len(SCALARS)))
    assert merged.set_values is not None
    bs = BatchStats(
        scalars=scalars,
        hists={n: merged.stats[n] for n in HISTS},
        vectors={n: merged.stats[n] for n in VECTORS},
        sets=merged.set_values,
        cov=np.zeros(0),
    )
    return to_table(bs, merged.keys["step"], np.full(g, -1), np.full(g, -1))


def test_compact_of_recorded_runs_equals_the_dense_route(tmp_path) -> None:
    """compact() over real recorded statistics (several ranks and files, a step spread over files) is the table
    the dense route gives, bit for bit (Table.equals compares every value)."""
    import rldiag
    from tests.analysis.test_io import make_record

    run = tmp_path / "run"
    rng = np.random.default_rng(11)
    for rank in range(3):
        with rldiag.Recorder(run, rank=rank, world_size=3, roll_steps=2, handle_signals=False) as rec:
            for step in range(7):
                for _ in range(2):
                    rec.record(step=step, **make_record(rng, 4, 8))
    table = rldiag.open_run(run).stats_table()
    assert table.column("h_lr.idx").num_chunks > 1
    got, want = aggregate.compact(table), _dense_compact(table)
    assert got.equals(want)
    empty = table.slice(0, 0)
    assert aggregate.compact(empty).equals(_dense_compact(empty))


def test_merge_sparse_of_single_rows_unsorted_or_with_zero_counts() -> None:
    """A group of one row takes a short path when its bins ascend; rows that do not (repeated or unordered bins)
    and zero counts give what densify gives."""
    lengths = np.array([3, 3, 2, 1])
    idx = np.array([5, 1, 5, 2, 3, 9, 4, 4, 7], np.uint16)
    cnt = np.array([2, 1, 3, 1, 0, 4, 1, 1, 5], np.uint32)
    groups = np.array([0, 1, 2, 3])
    dense = hist.densify(groups, 4, lengths, idx, cnt, hist.N_MAG)
    n, bins, counts = hist.merge_sparse(groups, 4, lengths, idx, cnt, hist.N_MAG)
    rows, cols = np.nonzero(dense)
    np.testing.assert_array_equal(n, np.bincount(rows, minlength=4))
    np.testing.assert_array_equal(bins, cols)
    np.testing.assert_array_equal(counts, dense[rows, cols])
