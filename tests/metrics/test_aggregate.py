"""Merge and finalize (rldiag.metrics.aggregate): exact over ranks, files, row order and micro-batch splits."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rldiag.metrics import aggregate
from rldiag.metrics.registry import REGISTRY
from rldiag.stats.kernel import STATS
from tests.metrics.reference import make_record
from tests.metrics.test_registry import RECORD_LOCAL, _stats_table


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n_ranks=st.integers(1, 4), data=st.data())
def test_merge_over_ranks_files_and_order_is_exact(seed: int, n_ranks: int, data) -> None:
    """Any assignment of records to ranks, any row order, any grouping of the merge: same metrics."""
    rng = np.random.default_rng(seed)
    records = [
        make_record(rng, int(rng.integers(1, 6)), int(rng.integers(1, 12)), group_offset=10 * i, nan_frac=0.05)
        for i in range(int(rng.integers(1, 7)))
    ]
    single = _stats_table(records, step=3)
    ranks = data.draw(st.lists(st.integers(0, n_ranks - 1), min_size=len(records), max_size=len(records)))
    parts = [_stats_table([r], step=3, rank=k, micro0=i) for i, (r, k) in enumerate(zip(records, ranks))]
    order = data.draw(st.permutations(range(len(parts))))
    shuffled = pa.concat_tables([parts[i] for i in order])
    want = aggregate.finalize(aggregate.merge(single)).row(0, named=True)
    got = aggregate.finalize(aggregate.merge(shuffled)).row(0, named=True)
    # associativity: merge per rank first, then merge the per-rank results' statistics
    by_rank = aggregate.merge(shuffled, by=("step", "rank"))
    for name in REGISTRY:
        w, g = want[name], got[name]
        assert (math.isnan(w) and math.isnan(g)) or g == pytest.approx(w, rel=1e-9, abs=1e-12), name
    assert by_rank.n_groups == len(set(ranks))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), cuts=st.lists(st.integers(1, 15), max_size=4))
def test_splitting_a_batch_into_micro_batches_is_exact(seed: int, cuts: list[int]) -> None:
    rng = np.random.default_rng(seed)
    B = 16
    rec = make_record(rng, B, 10, nan_frac=0.03)
    bounds = sorted(set([0, B] + [c for c in cuts if 0 < c < B]))
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        pieces.append({k: (v[a:b] if np.ndim(v) >= 1 else v) for k, v in rec.items()})
    want = aggregate.finalize(aggregate.merge(_stats_table([rec], 0))).row(0, named=True)
    got = aggregate.finalize(aggregate.merge(_stats_table(pieces, 0))).row(0, named=True)
    for name in REGISTRY:
        if name in RECORD_LOCAL:
            continue
        w, g = want[name], got[name]
        assert (math.isnan(w) and math.isnan(g)) or g == pytest.approx(w, rel=1e-9, abs=1e-12), name


def test_compacted_rows_merge_like_the_rows_they_replace() -> None:
    """The run index stores compact(t); merging later rows into it equals merging everything at once."""
    rng = np.random.default_rng(5)
    old = pa.concat_tables([_stats_table([make_record(rng, 4, 9)], step=s, rank=r) for s in (0, 1) for r in (0, 1)])
    new = pa.concat_tables([_stats_table([make_record(rng, 3, 7)], step=s, rank=2) for s in (1, 2)])
    want = aggregate.finalize(aggregate.merge(pa.concat_tables([old, new])))
    got = aggregate.finalize(aggregate.merge(pa.concat_tables([aggregate.compact(old), new])))
    assert got["step"].to_list() == [0, 1, 2]
    for name in REGISTRY:
        np.testing.assert_allclose(
            got[name].to_numpy(), want[name].to_numpy(), rtol=1e-12, equal_nan=True, err_msg=name
        )
    assert set(aggregate.merge(old, stats=set(STATS)).stats) == set(STATS)


def test_the_analysis_path_still_imports_merge_and_finalize() -> None:
    from rldiag.analysis import aggregate as old_path

    assert old_path.merge is aggregate.merge and old_path.finalize is aggregate.finalize
