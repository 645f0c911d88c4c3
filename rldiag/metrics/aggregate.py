"""Merge statistics exactly and finalize them into metrics (beside the registry whose specs it applies).

Merging is addition (sums, counts, histogram bins, bucket vectors), min/max, log-sum-exp and set union,
grouped by step (and optionally rank): never an average of averages. Finalizing applies each
:class:`~rldiag.metrics.registry.MetricSpec` to the merged statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rldiag.metrics.registry import REGISTRY, needed_stats
from rldiag.stats import hist
from rldiag.stats.kernel import HISTS, SCALARS, SETS, STATS, VECTORS

if TYPE_CHECKING:
    import polars as pl


@dataclass
class Merged:
    """Merged statistics: one entry per group (step, or (step, rank)), in ascending key order."""

    keys: dict[str, np.ndarray]
    stats: dict[str, np.ndarray]
    set_values: dict[str, list[np.ndarray]] | None = None
    """With ``keep_sets``: the members of each group's set statistics (for re-storing merged rows)."""

    @property
    def n_groups(self) -> int:
        return int(next(iter(self.keys.values())).size)


def _group_index(table: pa.Table, by: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    if table.num_rows == 0:
        return np.zeros(0, np.int64), {k: np.zeros(0, np.int64) for k in by}, 0
    cols = [table.column(k).to_numpy().astype(np.int64) for k in by]
    if len(cols) == 1:
        uniq, inv = np.unique(cols[0], return_inverse=True)
        return inv, {by[0]: uniq}, int(uniq.size)
    stacked = np.stack(cols, axis=1)
    uniq, inv = np.unique(stacked, axis=0, return_inverse=True)
    return inv.reshape(-1), {k: uniq[:, i] for i, k in enumerate(by)}, int(uniq.shape[0])


def _chunk_parts(col: pa.ChunkedArray | pa.Array) -> list[tuple[np.ndarray, np.ndarray]]:
    """(lengths per row, flat values) of each chunk of a list column, from its offsets and values (no per-row
    work, no copy of the values)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    out = []
    for arr in chunks:
        if arr.null_count:
            lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
            out.append((lengths.astype(np.int64), pc.list_flatten(arr).to_numpy(zero_copy_only=False)))
            continue
        off = arr.offsets.to_numpy()
        values = arr.values.slice(off[0], off[-1] - off[0]).to_numpy(zero_copy_only=False)
        out.append((np.diff(off).astype(np.int64), values))
    return out


def _list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(lengths per row, flat values) of a list column (one copy to join the chunks)."""
    parts = _chunk_parts(col)
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0)
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _densify_column(table: pa.Table, name: str, inv: np.ndarray, g: int, nb: int) -> np.ndarray:
    """The histogram ``name`` of every row added into one dense row per group, chunk by chunk (the values of a
    table of many files are never joined into one array)."""
    idx_parts = _chunk_parts(table.column(f"{name}.idx"))
    cnt_parts = _chunk_parts(table.column(f"{name}.cnt"))
    if len(idx_parts) != len(cnt_parts) or any(a[0].size != b[0].size for a, b in zip(idx_parts, cnt_parts)):
        lengths, idx = _list_parts(table.column(f"{name}.idx"))
        _, cnt = _list_parts(table.column(f"{name}.cnt"))
        return hist.densify(inv, g, lengths, idx, cnt, nb)
    out = np.zeros((g, nb))
    row = 0
    for (lengths, idx), (_, cnt) in zip(idx_parts, cnt_parts):
        hist.densify(inv[row : row + lengths.size], g, lengths, idx, cnt, nb, out=out)
        row += lengths.size
    if row != inv.size:
        raise ValueError(f"damaged sparse histogram {name}: {row} rows of lists for {inv.size} rows")
    return out


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distinct (a, b) pairs sorted by a then b, as an [n, 2] array (a lexsort: several times faster than
    ``np.unique(axis=0)``)."""
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    keep = np.ones(a.size, dtype=bool)
    keep[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return np.stack([a[keep], b[keep]], axis=1)


def merge(
    table: pa.Table,
    by: Sequence[str] = ("step",),
    stats: Iterable[str] | None = None,
    *,
    keep_sets: bool = False,
    sparse_hists: bool = False,
) -> Merged:
    """Merge the statistics rows of ``table`` by the key columns ``by``.

    ``stats`` limits the work to the statistics named (default: all that the registry needs). With
    ``sparse_hists``, a table that already holds one row per group, in order (the compacted statistics of a run),
    gives its histograms as :class:`rldiag.stats.hist.SparseRows` (quantiles without a dense matrix; the same
    values); otherwise histograms are dense float64 matrices.
    """
    wanted = set(needed_stats()) if stats is None else set(stats)
    set_values: dict[str, list[np.ndarray]] | None = {} if keep_sets else None
    inv, keys, g = _group_index(table, by)
    identity = g == table.num_rows and bool(np.all(inv == np.arange(g)))  # already one row per group, in order
    out: dict[str, np.ndarray] = {}
    for name in SCALARS:
        if name not in wanted:
            continue
        x = table.column(name).to_numpy()
        kind = STATS[name].merge
        if identity:
            out[name] = np.asarray(x, dtype=np.float64)
        elif kind == "sum":
            out[name] = np.bincount(inv, weights=x, minlength=g)
        elif kind == "min":
            acc = np.full(g, np.inf)
            np.minimum.at(acc, inv, x)
            out[name] = acc
        elif kind == "max":
            acc = np.full(g, -np.inf)
            np.maximum.at(acc, inv, x)
            out[name] = acc
        else:  # lse
            m = np.full(g, -np.inf)
            np.maximum.at(m, inv, x)
            safe = np.where(np.isfinite(m), m, 0.0)
            with np.errstate(over="ignore", invalid="ignore"):
                s = np.bincount(inv, weights=np.exp(x - safe[inv]), minlength=g)
                out[name] = np.where(np.isfinite(m), safe + np.log(np.where(s > 0, s, 1.0)), m)
    for name, nb in HISTS.items():
        if name not in wanted:
            continue
        if identity and sparse_hists:
            lengths, idx = _list_parts(table.column(f"{name}.idx"))
            _, cnt = _list_parts(table.column(f"{name}.cnt"))
            out[name] = hist.SparseRows(lengths, idx, cnt, nb)  # type: ignore[assignment]
        else:
            out[name] = _densify_column(table, name, inv, g, nb)
    for name in VECTORS:
        if name not in wanted:
            continue
        lengths, vals = _list_parts(table.column(name))
        nb = int(lengths.max()) if lengths.size else 0
        if nb and (lengths != nb).any():
            raise ValueError(
                f"statistics column {name} mixes bucket counts {sorted(set(lengths.tolist()))}; "
                "the run was recorded with different n_buckets settings"
            )
        mat = vals.reshape(-1, nb) if nb else np.zeros((table.num_rows, 0))
        acc = np.zeros((g, nb))
        np.add.at(acc, inv, mat)
        out[name] = acc
    for name in SETS:
        if name not in wanted:
            continue
        lengths, vals = _list_parts(table.column(name))
        if identity and set_values is None:  # stored sets are already unique per row
            out[name] = lengths.astype(np.float64)
            continue
        grp = np.repeat(inv, lengths)
        if vals.size:
            pairs = _unique_pairs(grp, vals.astype(np.int64))
            out[name] = np.bincount(pairs[:, 0], minlength=g).astype(np.float64)
        else:
            pairs = np.zeros((0, 2), np.int64)
            out[name] = np.zeros(g)
        if set_values is not None:
            bounds = np.searchsorted(pairs[:, 0], np.arange(g + 1))
            set_values[name] = [pairs[bounds[i] : bounds[i + 1], 1] for i in range(g)]
    return Merged(keys=keys, stats=out, set_values=set_values)


def compact(table: pa.Table) -> pa.Table:
    """Merge statistics rows into one row per step, in the statistics-table schema (rank and micro -1).

    Merging is associative, so ``merge(compact(t) + more)`` equals ``merge(t + more)``: the run index stores
    compacted rows and later files merge into them. Histograms merge sparse to sparse
    (:func:`rldiag.stats.hist.merge_sparse`): the same bins and counts as densifying and taking the non-empty
    bins again, without a ``[steps, bins]`` matrix per histogram.
    """
    from rldiag.stats.kernel import BatchStats
    from rldiag.stats.table import STATS_SCHEMA, to_table

    merged = merge(table, by=("step",), stats=set(STATS) - set(HISTS), keep_sets=True)
    g = merged.n_groups
    scalars = np.stack([merged.stats[name] for name in SCALARS], axis=1) if g else np.zeros((0, len(SCALARS)))
    assert merged.set_values is not None
    bs = BatchStats(
        scalars=scalars,
        hists={name: np.zeros((g, 0)) for name in HISTS},  # replaced below by the sparse merge
        vectors={n: merged.stats[n] for n in VECTORS},
        sets=merged.set_values,
        cov=np.zeros(0),
    )
    out = to_table(bs, merged.keys["step"], np.full(g, -1), np.full(g, -1))
    inv, _, _ = _group_index(table, ("step",))
    for name, nb in HISTS.items():
        lengths, idx = _list_parts(table.column(f"{name}.idx"))
        _, cnt = _list_parts(table.column(f"{name}.cnt"))
        n, bins, counts = hist.merge_sparse(inv, g, lengths, idx, cnt, nb)
        if counts.size and counts.max() >= 2**32:
            raise OverflowError(f"histogram {name} has a bin with more than 2**32 tokens in one step")
        offsets = np.zeros(g + 1, dtype=np.int32)
        np.cumsum(n, out=offsets[1:])
        for suffix, values in ((".idx", bins.astype(np.uint16)), (".cnt", counts.astype(np.uint32))):
            col = f"{name}{suffix}"
            arr = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)).cast(STATS_SCHEMA.field(col).type)
            out = out.set_column(out.schema.get_field_index(col), STATS_SCHEMA.field(col), arr)
    return out


def first_of_each_record(table: pa.Table) -> tuple[pa.Table, int]:
    """``table`` with each (step, rank, micro) key once (its first row), and how many repeats were removed
    (a file that holds a record twice counts its first copy only; the writer's summary and the reader agree)."""
    if table.num_rows < 2:
        return table, 0
    keys = pa.table(
        {
            "step": table.column("step"),
            "rank": table.column("rank"),
            "micro": table.column("micro"),
            "i": pa.array(range(table.num_rows), pa.int64()),
        }
    )
    first = keys.group_by(["step", "rank", "micro"], use_threads=False).aggregate([("i", "min")])
    if first.num_rows == table.num_rows:
        return table, 0
    return table.take(pc.sort_indices(first.column("i_min"))), table.num_rows - first.num_rows


SUMMARY_KEY_COLUMNS = ("rec_rank", "rec_micro")
"""Columns a segment summary adds to the statistics schema: per step, the rank and micro-batch of each record it
merged, in file order (duplicate detection compares records by key without reading them)."""


def segment_summary(records: pa.Table) -> tuple[pa.Table, int]:
    """The write-time summary of one statistics segment: its records (first of each key) merged per step by
    :func:`compact`, plus the :data:`SUMMARY_KEY_COLUMNS` of the records each step holds; and how many repeated
    records were left out.

    A reader folds these rows in place of the segment's records: the same statistics, the sums of each step
    adding the segment's records first (equal to folding the records one by one to rounding: 9e-12 relative at
    most on the benchmark run of docs/performance.md).
    """
    records, repeated = first_of_each_record(records)
    out = compact(records)
    steps = records.column("step").to_numpy()
    order = np.argsort(steps, kind="stable")
    offsets = np.zeros(out.num_rows + 1, dtype=np.int32)
    per_step = np.bincount(np.searchsorted(out.column("step").to_numpy(), steps), minlength=out.num_rows)
    np.cumsum(per_step, out=offsets[1:])
    for name, key in zip(SUMMARY_KEY_COLUMNS, ("rank", "micro")):
        values = records.column(key).to_numpy()[order].astype(np.int32)
        out = out.append_column(name, pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)))
    return out, repeated


def finalize(merged: Merged, names: Sequence[str] | None = None) -> pl.DataFrame:
    """Metrics from merged statistics: the key columns plus one Float64 column per metric name."""
    import polars as pl  # here, not at the top: the recorder's writer uses this module and never needs polars

    names = list(REGISTRY) if names is None else list(names)
    data: dict[str, np.ndarray] = {k: v.astype(np.int64) for k, v in merged.keys.items()}
    g = merged.n_groups
    for name in names:
        spec = REGISTRY[name]
        if g == 0:
            data[name] = np.zeros(0)
            continue
        with np.errstate(all="ignore"):
            vals = np.asarray(spec.finalize(merged.stats), dtype=np.float64)
        data[name] = np.broadcast_to(vals, (g,)).copy()
    from rldiag.stats import hist

    hist.clear_cache()
    for k in [k for k in merged.stats if "|" in k]:
        del merged.stats[k]
    schema = {k: pl.Int64 for k in merged.keys} | {n: pl.Float64 for n in names}
    return pl.DataFrame(data, schema=schema)


def metrics_of(table: pa.Table, by: Sequence[str] = ("step",), names: Sequence[str] | None = None) -> pl.DataFrame:
    """Merge and finalize in one call (only the statistics the named metrics need are merged)."""
    stats = needed_stats(list(names)) if names is not None else None
    return finalize(merge(table, by=by, stats=stats), names)
